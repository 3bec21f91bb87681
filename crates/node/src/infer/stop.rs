//! Stop sequences over a stream of text pieces.
//!
//! Text that might be the start of a stop sequence is held back until the next piece
//! shows whether it is; everything else is released at once, so streaming stays
//! token-by-token and no stop sequence text ever reaches the client.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::GenerateError;

/// Tokenizes a prompt the way every generation path does (special tokens parsed,
/// BOS added when the model wants it) and checks it fits in `n_ctx`.
pub(crate) fn prompt_tokens(
    model: &LlamaModel,
    prompt: &str,
    n_ctx: u32,
) -> Result<Vec<LlamaToken>, GenerateError> {
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
    if tokens.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if tokens.len() as u32 >= n_ctx {
        return Err(GenerateError::ContextExceeded {
            prompt_tokens: tokens.len() as u32,
            context_size: n_ctx,
        });
    }
    Ok(tokens)
}

/// Sampled tokens → text for the client: detokenizes (UTF-8 sequences split
/// across tokens are completed by the next token) and applies the stop sequences.
/// The local engine and the pipeline's requester both use it, so they emit the
/// same text for the same tokens.
#[derive(Debug)]
pub(crate) struct TextOut {
    stop: StopMatcher,
    utf8: encoding_rs::Decoder,
    piece: Vec<u8>,
    text: String,
}

impl TextOut {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stop: StopMatcher::new(stops),
            utf8: encoding_rs::UTF_8.new_decoder(),
            piece: Vec::with_capacity(32),
            text: String::with_capacity(64),
        }
    }

    /// Adds one generated token.
    pub(crate) fn push(&mut self, model: &LlamaModel, token: LlamaToken) -> Pushed {
        self.piece.clear();
        model
            .vocab()
            .token_to_piece_into(token, &mut self.piece, false, None);
        self.text.clear();
        self.text.reserve(
            self.utf8
                .max_utf8_buffer_length(self.piece.len())
                .unwrap_or(self.piece.len() * 3),
        );
        let _ = self
            .utf8
            .decode_to_string(&self.piece, &mut self.text, false);
        self.stop.push(&self.text)
    }

    /// Text held back as a possible stop-sequence start, which is real output
    /// after all (after a match nothing is held).
    pub(crate) fn finish(&mut self) -> String {
        self.stop.finish()
    }
}

/// Incremental stop-sequence matcher.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What a pushed piece produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Text safe to emit (may be empty); no stop sequence seen.
    Emit(String),
    /// A stop sequence matched: emit this text (before the match) and finish.
    Stop(String),
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub(crate) fn push(&mut self, piece: &str) -> Pushed {
        if self.stops.is_empty() {
            return Pushed::Emit(piece.to_string());
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return Pushed::Stop(out);
        }
        // Keep the shortest suffix that is a proper prefix of some stop sequence.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        Pushed::Emit(out)
    }

    /// Releases held-back text at the end of generation (no stop sequence came).
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_through_without_stops() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), Pushed::Emit("abc".into()));
    }

    #[test]
    fn holds_partial_match_and_stops_across_pieces() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), Pushed::Emit("hello ".into()));
        assert_eq!(m.push("N"), Pushed::Emit(String::new()));
        assert_eq!(m.push("D and more"), Pushed::Stop(String::new()));
    }

    #[test]
    fn releases_false_alarm() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("E"), Pushed::Emit(String::new()));
        assert_eq!(m.push("x"), Pushed::Emit("Ex".into()));
        assert_eq!(m.push("EN"), Pushed::Emit(String::new()));
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn earliest_stop_wins_and_text_before_is_kept() {
        let mut m = StopMatcher::new(vec!["b".into(), "xa".into()]);
        assert_eq!(m.push("1xab"), Pushed::Stop("1".into()));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["éz".into()]);
        assert_eq!(m.push("aé"), Pushed::Emit("a".into()));
        assert_eq!(m.push("é"), Pushed::Emit("é".into()));
        assert_eq!(m.push("z"), Pushed::Stop(String::new()));
    }
}
