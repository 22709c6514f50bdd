//! Rotary position embeddings: parameters and inverse frequencies.
//!
//! Configs spell RoPE two ways: hub style (top-level `rope_theta`, a `rope_scaling` dict keyed by
//! `type` or `rope_type`) and transformers-5 style (one `rope_parameters` dict holding `rope_theta`
//! too). [`RopeKeys`] accepts both; [`RopeSpec::inv_freq`] implements default, linear, llama3 and
//! YaRN scaling exactly as transformers' `ROPE_INIT_FUNCTIONS` do.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
pub use tessera_kernels::RopeLayout;

use crate::ConfigError;

/// The RoPE-related keys of a config, in either spelling.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeKeys {
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Map<String, Value>>,
    pub rope_parameters: Option<Map<String, Value>>,
    pub partial_rotary_factor: Option<f64>,
    /// Some configs (Phi-3) keep this at top level; transformers prefers it over the dict's.
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeSpec {
    pub theta: f64,
    /// Rotated dimensions per head (even).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
    pub layout: RopeLayout,
}

fn num(params: &Map<String, Value>, key: &str) -> Result<Option<f64>, ConfigError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            ConfigError::invalid(&format!("rope_parameters.{key}"), v, "must be a number")
        }),
    }
}

fn required(params: &Map<String, Value>, key: &str, kind: &str) -> Result<f64, ConfigError> {
    num(params, key)?.ok_or_else(|| {
        ConfigError::invalid(
            &format!("rope_parameters.{key}"),
            "missing",
            format!("required by rope_type `{kind}`"),
        )
    })
}

/// YaRN's magnitude correction `0.1·m·ln(s) + 1` (1 for `s ≤ 1`).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeKeys {
    /// Resolves the keys for a model whose RoPE acts on `head_dim` dims (before
    /// `partial_rotary_factor`), defaulting `rope_theta` to `default_theta`.
    pub fn resolve(
        &self,
        head_dim: usize,
        max_position_embeddings: usize,
        default_theta: f64,
        layout: RopeLayout,
    ) -> Result<RopeSpec, ConfigError> {
        let empty = Map::new();
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .unwrap_or(&empty);
        if params.values().any(|v| v.is_object()) {
            return Err(ConfigError::unsupported(
                "rope_parameters",
                "per-layer-type RoPE parameters",
            ));
        }
        let theta = num(params, "rope_theta")?
            .or(self.rope_theta)
            .unwrap_or(default_theta);
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let partial = num(params, "partial_rotary_factor")?
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        let rotary_dim = (head_dim as f64 * partial) as usize;
        let original = self
            .original_max_position_embeddings
            .or(num(params, "original_max_position_embeddings")?.map(|v| v as usize))
            .unwrap_or(max_position_embeddings);
        let scaling = match kind.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required(params, "factor", &kind)?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required(params, "factor", &kind)?,
                low_freq_factor: required(params, "low_freq_factor", &kind)?,
                high_freq_factor: required(params, "high_freq_factor", &kind)?,
                original_max_position_embeddings: original,
            },
            "yarn" => RopeScaling::Yarn {
                factor: num(params, "factor")?
                    .unwrap_or(max_position_embeddings as f64 / original as f64),
                original_max_position_embeddings: original,
                beta_fast: num(params, "beta_fast")?
                    .filter(|v| *v != 0.0)
                    .unwrap_or(32.0),
                beta_slow: num(params, "beta_slow")?
                    .filter(|v| *v != 0.0)
                    .unwrap_or(1.0),
                mscale: num(params, "mscale")?,
                mscale_all_dim: num(params, "mscale_all_dim")?,
                attention_factor: num(params, "attention_factor")?,
                truncate: params
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            },
            other => {
                return Err(ConfigError::unsupported(
                    "rope_type",
                    format!("`{other}` (supported: default, linear, llama3, yarn)"),
                ));
            }
        };
        let spec = RopeSpec {
            theta,
            rotary_dim,
            scaling,
            layout,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl RopeSpec {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) {
            return Err(ConfigError::invalid(
                "rotary dims",
                self.rotary_dim,
                "must be even and positive",
            ));
        }
        if !(self.theta > 1.0 && self.theta.is_finite()) {
            return Err(ConfigError::invalid(
                "rope_theta",
                self.theta,
                "must be > 1",
            ));
        }
        let factor = match &self.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor }
            | RopeScaling::Llama3 { factor, .. }
            | RopeScaling::Yarn { factor, .. } => *factor,
        };
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(ConfigError::invalid(
                "rope_parameters.factor",
                factor,
                "must be positive",
            ));
        }
        if let RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        } = self.scaling
            && high_freq_factor <= low_freq_factor
        {
            return Err(ConfigError::invalid(
                "rope_parameters.high_freq_factor",
                high_freq_factor,
                format!("must exceed low_freq_factor = {low_freq_factor}"),
            ));
        }
        Ok(())
    }

    /// The YaRN `mscale_all_dim` correction DeepSeek applies to its softmax scale (squared), or 1.
    pub fn deepseek_softmax_mscale(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim: Some(m),
                ..
            } if m != 0.0 => yarn_get_mscale(factor, m),
            _ => 1.0,
        }
    }

    /// Factor applied to cos and sin (YaRN's attention factor; 1 otherwise).
    pub fn attention_scaling(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                    yarn_get_mscale(factor, m) / yarn_get_mscale(factor, a)
                }
                _ => yarn_get_mscale(factor, 1.0),
            }),
            _ => 1.0,
        }
    }

    /// One inverse frequency per rotary pair.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim as f64;
        let base: Vec<f64> = (0..self.rotary_dim / 2)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / dim))
            .collect();
        let out: Vec<f64> = match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wl {
                            f
                        } else if wavelen > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let correction_dim = |rotations: f64| {
                    dim * (original_max_position_embeddings as f64 / (rotations * 2.0 * PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &extrapolation)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        (extrapolation / factor) * (1.0 - keep) + extrapolation * keep
                    })
                    .collect()
            }
        };
        out.into_iter().map(|v| v as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: Value) -> RopeKeys {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn both_spellings_resolve_to_the_same_spec() {
        let hub = keys(
            json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        let v5 = keys(
            json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        let a = hub.resolve(128, 131072, 10000.0, RopeLayout::Half).unwrap();
        let b = v5.resolve(128, 131072, 10000.0, RopeLayout::Half).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.theta, 500000.0);
    }

    #[test]
    fn default_and_linear_frequencies() {
        let spec = keys(json!({"rope_theta": 10000.0}))
            .resolve(4, 2048, 1.0, RopeLayout::Half)
            .unwrap();
        assert_eq!(spec.inv_freq(), vec![1.0, 0.01]);
        let lin = keys(json!({"rope_scaling": {"type": "linear", "factor": 2.0}}))
            .resolve(4, 2048, 10000.0, RopeLayout::Half)
            .unwrap();
        assert_eq!(lin.inv_freq(), vec![0.5, 0.005]);
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let spec = keys(json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .resolve(128, 131072, 10000.0, RopeLayout::Half)
        .unwrap();
        let plain = RopeSpec {
            scaling: RopeScaling::None,
            ..spec.clone()
        }
        .inv_freq();
        let scaled = spec.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn yarn_attention_factor_and_ramp() {
        let spec = keys(
            json!({"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40.0,
            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}}),
        )
        .resolve(64, 163840, 10000.0, RopeLayout::Interleaved)
        .unwrap();
        assert_eq!(spec.attention_scaling(), 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((spec.deepseek_softmax_mscale() - m).abs() < 1e-12);
        let f = spec.inv_freq();
        let plain = RopeSpec {
            scaling: RopeScaling::None,
            ..spec.clone()
        }
        .inv_freq();
        assert_eq!(f[0], plain[0], "fastest frequency extrapolates");
        assert!(
            (f[31] - plain[31] / 40.0).abs() < 1e-9,
            "slowest interpolates"
        );
    }

    #[test]
    fn unknown_rope_type_is_a_named_error() {
        let err = keys(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}))
            .resolve(64, 2048, 10000.0, RopeLayout::Half)
            .unwrap_err();
        assert!(err.to_string().contains("dynamic"), "{err}");
    }
}
