//! Chat templates: the Jinja template a model ships (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`) rendered with minijinja, with the Python string methods and helpers
//! (`raise_exception`, `strftime_now`) that Hugging Face templates use.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;
use serde_json::Value as Json;

use crate::serving::request::ServeError;

/// One chat message as templates see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// `bos_token` / `eos_token` are a string or an AddedToken object with `content`.
fn token_text(v: Option<&Json>) -> String {
    match v {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Loads the model folder's template; `Ok(None)` when it has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", config_path.display()))?,
            Err(_) => Json::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja).map_err(|e| format!("{}: {e}", jinja.display()))?
        } else {
            match config.get("chat_template") {
                Some(Json::String(s)) => s.clone(),
                // A list of named templates: use "default".
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Json::as_str))
                    .map(str::to_string)
                    .ok_or_else(|| {
                        format!(
                            "{}: chat_template has no \"default\" entry",
                            config_path.display()
                        )
                    })?,
                _ => return Ok(None),
            }
        };
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates use it to print today's date; a fixed, neutral value keeps prompts
            // reproducible across runs.
            "01 Jan 2026".to_string()
        });
        env.add_template_owned("chat", source)
            .map_err(|e| format!("{}: chat template does not parse: {e}", dir.display()))?;
        Ok(Some(ChatTemplate {
            env,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        }))
    }

    /// The prompt text for `messages`, ending with the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, ServeError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        template
            .render(context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => true,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| {
                ServeError::invalid("messages", format!("the chat template refused them: {e}"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_fixture_template_and_python_methods() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
        let t = ChatTemplate::load(&dir)
            .unwrap()
            .expect("the fixture has a template");
        let text = t
            .render(&[Message {
                role: "user".into(),
                content: "hi".into(),
            }])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );

        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("chat_template.jinja"),
            "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('only users') }}{% endif %}{{ bos_token }}{{ m.content.strip().upper() }}{% endfor %}",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}}"#,
        )
        .unwrap();
        let t = ChatTemplate::load(tmp.path()).unwrap().unwrap();
        let msg = |role: &str| Message {
            role: role.into(),
            content: "  yo ".into(),
        };
        assert_eq!(t.render(&[msg("user")]).unwrap(), "<s>YO");
        let e = t.render(&[msg("tool")]).unwrap_err();
        assert!(e.to_string().contains("only users"), "{e}");
    }
}
