//! A `matches` condition's own regex: checked at load, built when first needed.
//!
//! A pattern that `regex` would refuse is a config error at load, before the server is spawned
//! (SPEC §4). Building the regex itself costs far more than finding out whether it can be built:
//! in a fresh process each `Regex::new` made two Thompson compilers, each with a UTF-8 table of
//! some 400 KB written out afresh, then the prefilters and the lazy DFA's set-up, about 0.17 ms a
//! pattern on the 2-core dev VM (twenty regex rules added 3.3 ms to start-up). So at load a
//! pattern is only parsed and its forward and reverse NFAs compiled, by compilers kept for the
//! whole load, under `regex`'s own options and size limit: those are the only ways `Regex::new`
//! fails. The regex is built on the warm-up thread ([`crate::guard::Guard::warm_up`]) or at its
//! first search, whichever comes first. `regex`'s options live here for the regex groups too
//! ([`super::sets`]).

use std::cell::RefCell;
use std::sync::OnceLock;

use regex::Regex;
use regex_automata::nfa::thompson::{self, WhichCaptures};
use regex_automata::util::syntax;

/// `regex`'s default size limit for each of a regex's NFAs (and a `RegexSet`'s).
pub(super) const SIZE_LIMIT: usize = 10 * (1 << 20);

/// `regex::Regex::new`'s syntax options for `&str` haystacks.
pub(super) fn syntax_config() -> syntax::Config {
    syntax::Config::new().utf8(true)
}

/// A checked pattern and, once built, its regex.
#[derive(Debug)]
pub(super) struct PatternRegex {
    pattern: Box<str>,
    built: OnceLock<Option<Regex>>,
}

impl PatternRegex {
    /// Checks `pattern` as `Regex::new` would, with the same error.
    pub(super) fn new(pattern: &str) -> Result<PatternRegex, regex::Error> {
        check(pattern)?;
        Ok(PatternRegex {
            pattern: pattern.into(),
            built: OnceLock::new(),
        })
    }

    pub(super) fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Builds the regex now, if nothing has yet.
    pub(super) fn prepare(&self) {
        self.regex();
    }

    pub(super) fn is_match(&self, text: &str) -> bool {
        match self.regex() {
            Some(re) => re.is_match(text),
            // Not reached: the check at load is what `Regex::new` checks. Should it ever be, the
            // error is logged and the condition holds (the rule resting on it applies).
            None => true,
        }
    }

    fn regex(&self) -> Option<&Regex> {
        self.built
            .get_or_init(|| {
                Regex::new(&self.pattern)
                    .inspect_err(|e| {
                        tracing::error!(pattern = %self.pattern, error = %e, "a checked regex failed to build")
                    })
                    .ok()
            })
            .as_ref()
    }
}

/// The compilers of [`check`]: a forward and a reverse one.
type Compilers = (thompson::Compiler, thompson::Compiler);

thread_local! {
    /// Kept between checks, so that their UTF-8 tables (some 400 KB each) are made once per
    /// load, and let go by [`release`] when the load is done.
    static COMPILERS: RefCell<Option<Compilers>> = const { RefCell::new(None) };
}

fn compilers() -> Compilers {
    let config = thompson::Config::new()
        .utf8(true)
        .nfa_size_limit(Some(SIZE_LIMIT))
        .shrink(false);
    let mut forward = thompson::Compiler::new();
    forward.configure(config.clone().which_captures(WhichCaptures::All));
    let mut reverse = thompson::Compiler::new();
    reverse.configure(config.reverse(true).which_captures(WhichCaptures::None));
    (forward, reverse)
}

/// Frees the compilers this thread's checks kept.
pub(super) fn release() {
    COMPILERS.with(|c| c.borrow_mut().take());
}

/// Whether this thread holds compilers.
#[cfg(test)]
pub(super) fn kept() -> bool {
    COMPILERS.with(|c| c.borrow().is_some())
}

/// What `Regex::new(pattern)` checks, and the error it gives: the syntax (parsed as for a
/// `&str` haystack), then the size of the forward NFA and of the reverse one, which `regex`'s
/// engine builds as soon as its lazy DFA is enabled, as it is by default.
fn check(pattern: &str) -> Result<(), regex::Error> {
    let hir = syntax::parse_with(pattern, &syntax_config())
        .map_err(|e| regex::Error::Syntax(e.to_string()))?;
    COMPILERS.with(|c| {
        let mut c = c.borrow_mut();
        let (forward, reverse) = c.get_or_insert_with(compilers);
        for compiler in [&*forward, &*reverse] {
            compiler
                .build_from_hir(&hir)
                .map_err(|e| match e.size_limit() {
                    Some(limit) => regex::Error::CompiledTooBig(limit),
                    None => regex::Error::Syntax(e.to_string()),
                })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check says what `Regex::new` says, word for word, for good and bad patterns alike.
    #[test]
    fn the_check_refuses_what_regex_refuses_with_its_words() {
        let patterns = [
            "^/etc/(passwd|shadow)",
            "(?i)drop\\s+table",
            "^/home/[^/]+/\\.ssh/",
            "\\bword\\b",
            "",
            "(unclosed",
            "[z-a]",
            "a{5,2}",
            "\\p{NotAClass}",
            "(?<name>x)(?<name>y)",
            "x{1001}",
            // Beyond the size limit, forwards and backwards alike.
            "\\w{1000}{1000}",
            "(?i)[a-z\\p{Greek}]{300}{300}",
        ];
        for p in patterns {
            let ours = PatternRegex::new(p).map(|_| ()).map_err(|e| e.to_string());
            let regex = Regex::new(p).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(ours, regex, "{p:?}");
        }
        assert!(
            matches!(
                PatternRegex::new("\\w{1000}{1000}"),
                Err(regex::Error::CompiledTooBig(_))
            ),
            "the size limit is checked"
        );
    }

    #[test]
    fn the_compilers_are_kept_between_checks_and_let_go_after() {
        PatternRegex::new("(?i)drop\\s+table").unwrap();
        assert!(kept());
        release();
        assert!(!kept());
    }

    #[test]
    fn the_regex_is_built_at_the_first_search_or_when_prepared() {
        let p = PatternRegex::new("(?i)\\.(pem|key)$").unwrap();
        assert!(p.built.get().is_none(), "nothing is built at load");
        assert!(p.is_match("/home/a/id.PEM"));
        assert!(!p.is_match("/home/a/id.pub"));
        assert!(p.built.get().is_some_and(Option::is_some));

        let q = PatternRegex::new("^/etc/").unwrap();
        std::thread::spawn({
            let q = std::sync::Arc::new(q);
            move || {
                q.prepare();
                assert!(q.built.get().is_some_and(Option::is_some));
            }
        })
        .join()
        .unwrap();
    }
}
