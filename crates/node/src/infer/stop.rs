//! Stop sequences over a stream of text pieces.
//!
//! Text that might be the start of a stop sequence is held back until the next piece
//! shows whether it is; everything else is released at once, so streaming stays
//! token-by-token and no stop sequence text ever reaches the client.

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
