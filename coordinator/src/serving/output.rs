//! Per-request output processing on the coordinator: incremental detokenisation and stop
//! strings. Text that could still turn out to be the start of a stop string is held back, so a
//! client never receives a stop string (or part of one), and streamed deltas always concatenate
//! to the final text.

use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

#[derive(Debug, Default)]
pub struct OutputState {
    decoder: IncrementalDecoder,
    /// All generated text so far (up to a matched stop string).
    text: String,
    /// Bytes of `text` already handed to the client.
    emitted: usize,
    stops: Vec<String>,
    /// Bytes held back: the longest stop string minus one.
    hold: usize,
}

impl OutputState {
    pub fn new(stops: Vec<String>) -> Self {
        // Saturating: validation refuses empty stop strings, but this must not underflow on one.
        let hold = stops
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .saturating_sub(1);
        OutputState {
            stops,
            hold,
            ..Default::default()
        }
    }

    /// Adds a generated token; returns the text that may be sent now and whether a stop string
    /// was completed (then the text ends just before it and the request is over).
    pub fn push(
        &mut self,
        tok: Option<&Tokenizer>,
        id: u32,
    ) -> Result<(String, bool), TokenizerError> {
        let Some(tok) = tok else {
            return Ok((String::new(), false));
        };
        self.text.push_str(&self.decoder.push(tok, id)?);
        // A stop string cannot start before `emitted`: that much was held back.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[self.emitted..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(self.emitted + at);
            return Ok((self.take(self.text.len()), true));
        }
        let mut safe = self.text.len().saturating_sub(self.hold).max(self.emitted);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        Ok((self.take(safe), false))
    }

    /// Everything not yet sent, when the request ends for another reason than a stop string.
    pub fn finish(&mut self, tok: Option<&Tokenizer>) -> Result<String, TokenizerError> {
        if let Some(tok) = tok {
            self.text.push_str(&self.decoder.finish(tok)?);
        }
        Ok(self.take(self.text.len()))
    }

    /// The whole text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        let out = self.text[self.emitted.min(upto)..upto].to_string();
        self.emitted = self.emitted.max(upto);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tessera-demo");
        Tokenizer::load(&dir)
            .unwrap()
            .expect("the demo model has a tokenizer")
    }

    /// Streams `text`'s tokens through an [`OutputState`]; returns (sent text, stopped).
    fn stream(tok: &Tokenizer, text: &str, stops: &[&str]) -> (String, bool) {
        let mut out = OutputState::new(stops.iter().map(|s| s.to_string()).collect());
        let mut sent = String::new();
        for id in tok.encode(text, false).unwrap() {
            let (delta, stopped) = out.push(Some(tok), id).unwrap();
            sent.push_str(&delta);
            if stopped {
                return (sent, true);
            }
        }
        sent.push_str(&out.finish(Some(tok)).unwrap());
        (sent, false)
    }

    #[test]
    fn stop_strings_end_the_text_before_them_and_are_never_sent() {
        let tok = tokenizer();
        let text = "A fool and his money are soon parted. -- Proverb";
        assert_eq!(stream(&tok, text, &[]), (text.to_string(), false));
        assert_eq!(
            stream(&tok, text, &["soon", "Proverb"]),
            ("A fool and his money are ".to_string(), true)
        );
        // A stop string spanning several tokens, and one that never completes.
        assert_eq!(
            stream(&tok, text, &["parted. --", "partedX"]),
            ("A fool and his money are soon ".to_string(), true)
        );
        assert_eq!(stream(&tok, text, &["zzz"]), (text.to_string(), false));
    }
}
