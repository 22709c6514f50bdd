//! Bodies of the cargo-fuzz targets over what clients send (`fuzz/fuzz_targets/`): HTTP request
//! bodies through parsing, the chat template and [`ModelInfo::validate`], and text and token ids
//! through the tokenizer, the incremental decoder and stop strings.
//!
//! They live here, behind the `fuzz-targets` feature, so that `tests/fuzz_regressions.rs` can run
//! them on stable Rust over the checked-in regression inputs. Both use the `qwen3_moe` test
//! fixture (its tokenizer, chat template and config), found through this crate's source path. A
//! target returns normally for every input; a panic is the finding.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tessera_common::{GenerationConfig, load_model_spec};

use crate::http::{chat_request, completion_request};
use crate::scheduler::Priority;
use crate::serving::chat::ChatTemplate;
use crate::serving::output::OutputState;
use crate::serving::request::MAX_TOP_LOGPROBS;
use crate::serving::{ModelInfo, RawRequest, ServeError};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe")
}

/// The fixture's tokenizer, loaded once per process.
fn tokenizer() -> &'static Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| match Tokenizer::load(&fixture()) {
        Ok(Some(t)) => Arc::new(t),
        other => panic!("the qwen3_moe fixture's tokenizer: {:?}", other.err()),
    })
}

/// What a server of the fixture would know about its model.
fn model_info() -> &'static ModelInfo {
    static INFO: OnceLock<ModelInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let dir = fixture();
        let spec = load_model_spec(&dir).unwrap_or_else(|e| panic!("fixture config: {e}"));
        ModelInfo {
            name: "qwen3_moe".into(),
            architecture: spec.architecture.clone(),
            vocab_size: spec.vocab_size,
            max_context: spec.max_position_embeddings,
            eos_token_ids: spec.eos_token_ids.clone(),
            generation: GenerationConfig::load(&dir)
                .unwrap_or_else(|e| panic!("fixture generation config: {e}")),
            tokenizer: Some(Arc::clone(tokenizer())),
            chat: ChatTemplate::load(&dir).unwrap_or_else(|e| panic!("fixture template: {e}")),
            world_size: 1,
            backend: "cpu".into(),
            kv_blocks: 64,
            block_size: 16,
            placement_json: String::new(),
        }
    })
}

/// The first byte picks the endpoint (even: `/v1/completions`, odd: `/v1/chat/completions`); the
/// rest is the body. A body is refused with an error or becomes parameters that hold what the
/// scheduler relies on.
pub fn http_request(data: &[u8]) {
    let Some((&endpoint, body)) = data.split_first() else {
        return;
    };
    let info = model_info();
    let raw: Result<RawRequest, ServeError> = if endpoint % 2 == 0 {
        match completion_request(body) {
            Ok(req) => req.into_raw(),
            Err(_) => return,
        }
    } else {
        match chat_request(body) {
            Ok(req) => req.messages().and_then(|messages| {
                let template = info.chat.as_ref().ok_or_else(|| {
                    ServeError::Internal("the fixture has a chat template".into())
                })?;
                let prompt = template.render(&messages)?;
                req.into_raw(prompt)
            }),
            Err(_) => return,
        }
    };
    let Ok(raw) = raw else {
        return;
    };
    let Ok(params) = info.validate(raw, Priority::Interactive) else {
        return;
    };
    assert!(!params.prompt.is_empty(), "an empty prompt was accepted");
    assert!(
        params
            .prompt
            .iter()
            .all(|t| (*t as usize) < info.vocab_size),
        "a token id outside the vocabulary was accepted: {:?}",
        params.prompt
    );
    assert!(
        params.max_tokens >= 1 && params.prompt.len() + params.max_tokens <= info.max_context,
        "{} prompt + {} new tokens exceed the context of {}",
        params.prompt.len(),
        params.max_tokens,
        info.max_context
    );
    assert!(params.top_logprobs <= MAX_TOP_LOGPROBS);
    assert!(params.sampling.validate().is_ok(), "{:?}", params.sampling);
    let _ = OutputState::new(params.stop_strings);
}

/// The first byte splits the rest into text (encoded, with and without special tokens) and
/// little-endian u16 token ids (many beyond the vocabulary), which stream through the
/// incremental decoder, whose deltas must add up to the whole decode, and through stop-string
/// handling with stop strings cut from the text.
pub fn tokenizer_input(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (text, id_bytes) = rest.split_at(usize::from(split).min(rest.len()));
    let tok = tokenizer();
    let text = String::from_utf8_lossy(text);
    for special in [false, true] {
        if let Ok(ids) = tok.encode(&text, special) {
            let _ = tok.decode(&ids, false);
        }
    }
    let ids: Vec<u32> = id_bytes
        .chunks(2)
        .map(|c| u32::from(c[0]) | c.get(1).map_or(0, |b| u32::from(*b) << 8))
        .collect();

    let mut decoder = IncrementalDecoder::new();
    let mut streamed = String::new();
    for &id in &ids {
        match decoder.push(tok, id) {
            Ok(delta) => streamed.push_str(&delta),
            Err(_) => return,
        }
    }
    let Ok(rest) = decoder.finish(tok) else {
        return;
    };
    streamed.push_str(&rest);
    if let Ok(whole) = tok.decode(&ids, true) {
        assert_eq!(
            streamed, whole,
            "streamed deltas differ from decoding {ids:?}"
        );
    }

    // Stop strings as validation admits them: non-empty, at most 16.
    let stops: Vec<String> = text
        .split('\n')
        .filter(|s| !s.is_empty())
        .take(crate::serving::request::MAX_STOP_STRINGS)
        .map(str::to_string)
        .collect();
    let mut out = OutputState::new(stops.clone());
    let mut sent = String::new();
    for &id in &ids {
        match out.push(Some(tok), id) {
            Ok((delta, stopped)) => {
                sent.push_str(&delta);
                if stopped {
                    assert!(
                        !stops.iter().any(|s| sent.contains(s.as_str())),
                        "sent text {sent:?} contains a stop string of {stops:?}"
                    );
                    return;
                }
            }
            Err(_) => return,
        }
    }
    if let Ok(rest) = out.finish(Some(tok)) {
        sent.push_str(&rest);
    }
    assert_eq!(
        sent,
        out.text(),
        "sent text differs from the generated text"
    );
}
