//! Many `matches` conditions on one field, searched together.
//!
//! Each regex search has a fixed cost (about 15–45 ns on a short value) whatever the pattern, so a
//! rule set with many `matches` conditions spends its time starting searches, not scanning. A
//! [`RegexGroup`] holds the distinct patterns that `matches` conditions apply to one field (up to
//! [`GROUP_PATTERNS`], one bit each); [`RegexGroup::search`] answers for all of them with a few
//! multi-pattern searches over the field's text, and the rules then read bits.
//!
//! Every pattern keeps its own regex too ([`super::pattern`]), checked at load so that a bad
//! pattern is still an error with its path: a group answers only for the patterns it can search
//! cheaply, and the caller asks the pattern's own regex about the rest ([`Found::known`]). The
//! answers are the same either way: a multi-pattern search with [`MatchKind::All`] reports every
//! pattern that matches anywhere in the text, which is what `Regex::is_match` says for each one,
//! and the patterns are parsed and compiled with the options `regex` uses.
//!
//! The multi-pattern searches are compiled beside start-up on another thread
//! ([`crate::guard::Guard::warm_up`]), or on the first search if that comes first, not at load, so
//! they cost start-up nothing. The patterns are split by anchoring, because a search with all of them at
//! once is not always cheaper than one search per pattern:
//!
//! - patterns anchored at the start (`^/etc/`): together they are one anchored search, which
//!   stops as soon as no pattern can match, like each pattern alone;
//! - unanchored patterns (`secret-`): each one alone scans the whole text; together, one scan;
//! - patterns anchored only at the end (`\.pem$`): alone, each is checked backwards from the end
//!   of the text, whatever its length; together they scan it forwards. So they are searched
//!   together only in a text short enough ([`END_BYTES_PER_PATTERN`]) for one scan to cost less
//!   than the searches it replaces.
//!
//! A class with a single pattern is left to that pattern's own regex.

use std::cell::RefCell;
use std::sync::OnceLock;

use regex_automata::nfa::thompson::WhichCaptures;
use regex_automata::util::syntax;
use regex_automata::{Input, MatchKind, PatternID, PatternSet, meta};
use regex_syntax::hir::{Hir, Look};

/// Most patterns in one group: a search's answer is two `u64` bit sets.
pub(super) const GROUP_PATTERNS: usize = 64;

/// Patterns anchored only at the end are searched together in a text of at most this many bytes
/// per pattern: a forward scan costs about 1–2.5 ns a byte, one backward check about 25 ns.
const END_BYTES_PER_PATTERN: usize = 32;

/// What a group search found: `known` has a bit for each pattern it decided, `hits` for each of
/// those that matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Found {
    pub(super) known: u64,
    pub(super) hits: u64,
}

impl Found {
    /// Every pattern decided: none matches (a value that is not text).
    pub(super) const NO_MATCH: Found = Found {
        known: u64::MAX,
        hits: 0,
    };

    /// `Some(matched)` when the search decided pattern `b`.
    pub(super) fn get(self, b: u8) -> Option<bool> {
        let b = bit(b);
        (self.known & b != 0).then_some(self.hits & b != 0)
    }
}

/// The bit of pattern `b` in a [`Found`] (none past [`GROUP_PATTERNS`]).
pub(super) fn bit(b: u8) -> u64 {
    1u64.checked_shl(u32::from(b)).unwrap_or(0)
}

/// The distinct patterns of the `matches` conditions that read one field.
#[derive(Debug, Clone, Default)]
pub(super) struct RegexGroup {
    /// Pattern `i` is bit `i` of a [`Found`].
    patterns: Vec<Box<str>>,
    /// Built on the first search.
    parts: OnceLock<Box<[Part]>>,
}

/// One multi-pattern search over some of a group's patterns.
#[derive(Debug, Clone)]
struct Part {
    set: meta::Regex,
    /// The group bit of each of the set's patterns, by pattern id.
    bits: Box<[u8]>,
    /// All of `bits`.
    mask: u64,
    /// The longest text this part searches; longer ones are left to each pattern's own regex.
    max_len: usize,
}

impl RegexGroup {
    /// The bit of `pattern`, added if it is new; `None` when the group is full.
    pub(super) fn add(&mut self, pattern: &str) -> Option<u8> {
        let i = match self.patterns.iter().position(|p| **p == *pattern) {
            Some(i) => i,
            None if self.patterns.len() < GROUP_PATTERNS => {
                self.patterns.push(pattern.into());
                self.patterns.len() - 1
            }
            None => return None,
        };
        u8::try_from(i).ok()
    }

    /// Builds the searches, if not yet done.
    pub(super) fn prepare(&self) {
        self.parts.get_or_init(|| build(&self.patterns));
    }

    #[cfg(test)]
    pub(super) fn is_prepared(&self) -> bool {
        self.parts.get().is_some()
    }

    /// Which of the group's patterns match somewhere in `text`, for those it can search cheaply.
    pub(super) fn search(&self, text: &str) -> Found {
        let parts = self.parts.get_or_init(|| build(&self.patterns));
        let mut found = Found::default();
        for part in parts.iter().filter(|p| text.len() <= p.max_len) {
            found.known |= part.mask;
            found.hits |= part.search(text);
        }
        found
    }
}

thread_local! {
    /// The patterns one search found: kept per thread so that a search does not allocate.
    static MATCHED: RefCell<PatternSet> = RefCell::new(PatternSet::new(GROUP_PATTERNS));
}

impl Part {
    /// The group bits of the patterns matching in `text`.
    fn search(&self, text: &str) -> u64 {
        let run = |matched: &mut PatternSet| {
            matched.clear();
            self.set
                .which_overlapping_matches(&Input::new(text), matched);
            if matched.is_empty() {
                return 0;
            }
            // Not `matched.iter()`, which visits all of its capacity.
            self.bits
                .iter()
                .enumerate()
                .filter(|&(id, _)| PatternID::new(id).is_ok_and(|id| matched.contains(id)))
                .fold(0, |acc, (_, &b)| acc | bit(b))
        };
        MATCHED
            .try_with(|m| m.try_borrow_mut().ok().map(|mut m| run(&mut m)))
            .ok()
            .flatten()
            .unwrap_or_else(|| run(&mut PatternSet::new(GROUP_PATTERNS)))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Anchoring {
    Start,
    End,
    None,
}

/// The searches for a group's patterns. A pattern that fails to parse or to join a set (which
/// the check of its own regex at load rules out) is left to that regex.
fn build(patterns: &[Box<str>]) -> Box<[Part]> {
    let config = super::pattern::syntax_config();
    let mut classes: [(Anchoring, Vec<(Hir, u8)>); 3] = [
        (Anchoring::Start, Vec::new()),
        (Anchoring::None, Vec::new()),
        (Anchoring::End, Vec::new()),
    ];
    for (i, p) in patterns.iter().enumerate() {
        let (Ok(hir), Ok(bit)) = (syntax::parse_with(p, &config), u8::try_from(i)) else {
            continue;
        };
        let class = anchoring(&hir);
        if let Some((_, list)) = classes.iter_mut().find(|(a, _)| *a == class) {
            list.push((hir, bit));
        }
    }
    classes
        .into_iter()
        .filter(|(_, list)| list.len() >= 2)
        .filter_map(|(class, list)| {
            let (hirs, bits): (Vec<Hir>, Vec<u8>) = list.into_iter().unzip();
            let set = meta::Builder::new()
                .configure(set_config())
                .build_many_from_hir(&hirs)
                .ok()?;
            let max_len = match class {
                Anchoring::End => END_BYTES_PER_PATTERN * bits.len(),
                Anchoring::Start | Anchoring::None => usize::MAX,
            };
            Some(Part {
                set,
                mask: bits.iter().fold(0, |acc, &b| acc | bit(b)),
                bits: bits.into(),
                max_len,
            })
        })
        .collect()
}

fn anchoring(hir: &Hir) -> Anchoring {
    let props = hir.properties();
    if props.look_set_prefix().contains(Look::Start) {
        Anchoring::Start
    } else if props.look_set_suffix().contains(Look::End) {
        Anchoring::End
    } else {
        Anchoring::None
    }
}

/// `regex::RegexSet::new`'s options.
fn set_config() -> meta::Config {
    meta::Config::new()
        .nfa_size_limit(Some(super::pattern::SIZE_LIMIT))
        .hybrid_cache_capacity(2 * (1 << 20))
        .match_kind(MatchKind::All)
        .utf8_empty(true)
        .which_captures(WhichCaptures::None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn group(patterns: &[&str]) -> RegexGroup {
        let mut g = RegexGroup::default();
        for (i, p) in patterns.iter().enumerate() {
            assert_eq!(g.add(p), Some(i as u8), "{p:?}");
        }
        g
    }

    /// For every text, each pattern the group decides is decided as its own regex decides it.
    fn agrees(patterns: &[&str], texts: &[&str]) -> Found {
        let g = group(patterns);
        let mut known = u64::MAX;
        for text in texts {
            let found = g.search(text);
            known &= found.known;
            for (i, p) in patterns.iter().enumerate() {
                if let Some(hit) = found.get(i as u8) {
                    let alone = Regex::new(p).unwrap().is_match(text);
                    assert_eq!(hit, alone, "pattern {p:?} on {text:?}");
                }
            }
        }
        Found { known, hits: 0 }
    }

    #[test]
    fn a_group_search_agrees_with_each_regex_alone() {
        let patterns = [
            r"^/etc/",
            r"^/home/[^/]+/\.ssh/",
            r"(?i)^C:\\",
            r"^1\.5$",
            r"^$",
            r"\A-?\d+\z",
            r"(?i)\.(pem|key)$",
            r"\.csv$",
            r"(?m)^rm$",
            r"(?i)drop\s+table",
            r"secret-\d",
            r"\brm\s+-rf\b",
            r"(?i)ÉTÉ",
            r"a*",
            r"",
            r"[^\x00-\x7f]",
            r"(?s).{3}$",
            r"(?x) r m",
        ];
        let texts = [
            "",
            "/etc/passwd",
            "/home/bob/.ssh/id_rsa",
            "c:\\windows",
            "1.5",
            "-42",
            "KEY.PEM",
            "report.csv",
            "x.csv\n",
            "ls\nrm\nls",
            "please DROP   TABLE users",
            "a secret-7 here",
            "sudo rm -rf /",
            "l'été",
            "naïve",
            "line\nbreak",
            &"long text with no dots at all ".repeat(100),
            &format!("{}.pem", "x".repeat(5000)),
        ];
        let covered = agrees(&patterns, &texts);
        // The anchored and unanchored classes answer for every text; the end-anchored class
        // (patterns 6, 7 and 16) only for short ones.
        let end = 1 << 6 | 1 << 7 | 1 << 16;
        let all = (1u64 << patterns.len()) - 1;
        assert_eq!(covered.known & all, all & !end, "{covered:?}");
    }

    #[test]
    fn end_anchored_patterns_are_searched_together_only_in_short_texts() {
        let g = group(&[r"\.pem$", r"\.key$", r"^/etc/", r"secret"]);
        let short = g.search("/etc/x.pem");
        assert_eq!(short.get(0), Some(true));
        assert_eq!(short.get(1), Some(false));
        let long = g.search(&format!("/{}.pem", "x".repeat(100)));
        assert_eq!(long.get(0), None, "left to the pattern's own regex");
        assert_eq!(long.get(1), None);
        // Single-pattern classes are left to their regex too.
        assert_eq!(short.get(2), None);
        assert_eq!(short.get(3), None);
    }

    #[test]
    fn a_group_holds_distinct_patterns_up_to_its_size() {
        let mut g = RegexGroup::default();
        assert_eq!(g.add("a"), Some(0));
        assert_eq!(g.add("b"), Some(1));
        assert_eq!(g.add("a"), Some(0));
        for i in 2..GROUP_PATTERNS {
            assert_eq!(g.add(&format!("p{i}")), Some(i as u8));
        }
        assert_eq!(g.add("one too many"), None);
        assert_eq!(g.add("b"), Some(1));
        // A full group searches every pattern.
        let found = g.search("p63, p2, b");
        assert_eq!(found.get(63), Some(true));
        assert_eq!(found.get(2), Some(true));
        assert_eq!(found.get(1), Some(true));
        assert_eq!(found.get(0), Some(false));
        assert_eq!(found.get(64), None);
    }
}
