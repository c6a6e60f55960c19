//! What is synchronized: which source databases, where they land, and
//! which keys (`--include` / `--exclude`).

use std::collections::BTreeMap;

use crate::command::{self, CommandSpec};
use crate::resp::Command;

/// The databases to copy and their destination numbers.
///
/// By default every database is copied to the database of the same number.
/// `--db N` (repeatable) restricts the set; `--db-map SRC:DST` renames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbFilter {
    /// `None`: every database.
    only: Option<Vec<u32>>,
    map: BTreeMap<u32, u32>,
}

impl DbFilter {
    pub fn new(only: Vec<u32>, map: BTreeMap<u32, u32>) -> DbFilter {
        let only = if only.is_empty() {
            // A mapping names its source databases; mapping without --db
            // still copies every other database unchanged.
            None
        } else {
            Some(only)
        };
        DbFilter { only, map }
    }

    /// Every database, unchanged.
    pub fn all() -> DbFilter {
        DbFilter::default()
    }

    /// The target database for source database `db`, or `None` when `db` is
    /// not synchronized.
    pub fn target_db(&self, db: u32) -> Option<u32> {
        if let Some(only) = &self.only {
            if !only.contains(&db) {
                return None;
            }
        }
        Some(self.map.get(&db).copied().unwrap_or(db))
    }

    /// The source databases explicitly selected (`None`: all).
    pub fn selected(&self) -> Option<&[u32]> {
        self.only.as_deref()
    }

    pub fn mapping(&self) -> &BTreeMap<u32, u32> {
        &self.map
    }
}

/// A key pattern: a prefix, or a Redis glob (`*`, `?`, `[...]`, `\`) when
/// it holds one of `*?[`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPattern {
    Prefix(Vec<u8>),
    Glob(Vec<u8>),
}

impl KeyPattern {
    pub fn parse(text: &str) -> KeyPattern {
        if text.contains(['*', '?', '[']) {
            KeyPattern::Glob(text.as_bytes().to_vec())
        } else {
            KeyPattern::Prefix(text.as_bytes().to_vec())
        }
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            KeyPattern::Prefix(p) => key.starts_with(p),
            KeyPattern::Glob(g) => glob_match(g, key),
        }
    }
}

/// Which keys are synchronized: those matching an include pattern (every
/// key when there is none) and no exclude pattern.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFilter {
    include: Vec<KeyPattern>,
    exclude: Vec<KeyPattern>,
}

/// What a key filter keeps of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kept {
    /// Every key is kept (or the command has none): replay it as it is.
    All,
    /// It changes no kept key: drop it.
    Nothing,
    /// These commands do to the kept keys what it did.
    Part(Vec<Command>),
    /// It moves data between kept and dropped keys: no equivalent.
    Mixed,
}

impl KeyFilter {
    pub fn new(include: Vec<KeyPattern>, exclude: Vec<KeyPattern>) -> KeyFilter {
        KeyFilter { include, exclude }
    }

    /// Every key.
    pub fn all() -> KeyFilter {
        KeyFilter::default()
    }

    pub fn is_all(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    pub fn keeps(&self, key: &[u8]) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(key)))
            && !self.exclude.iter().any(|p| p.matches(key))
    }

    /// What to replay of `cmd` (whose table row is `spec`). Independent keys
    /// are trimmed to the kept ones (DEL, MSET, SMOVE as SREM/SADD, ...); a
    /// command that only reads the kept keys is dropped; RENAME of a kept
    /// key to a dropped one deletes it, LMOVE/RPOPLPUSH from a kept list to
    /// a dropped one pops it.
    pub fn keep(&self, spec: Option<&CommandSpec>, cmd: &Command) -> Kept {
        if self.is_all() {
            return Kept::All;
        }
        let Some(spec) = spec else {
            // Unknown commands (modules) take their key first.
            return match cmd.get(1) {
                Some(key) if !self.keeps(key) => Kept::Nothing,
                _ => Kept::All,
            };
        };
        let keys = command::key_positions_read_only(spec, cmd);
        if keys.is_empty() {
            return Kept::All;
        }
        let kept: Vec<bool> = keys.iter().map(|&(p, _)| self.keeps(cmd.arg(p))).collect();
        if kept.iter().all(|&k| k) {
            return Kept::All;
        }
        // Nothing written to a kept key.
        if keys.iter().zip(&kept).all(|(&(_, ro), &k)| !k || ro) {
            return Kept::Nothing;
        }
        let positions: Vec<usize> = keys.iter().map(|&(p, _)| p).collect();
        if let Some(Ok(parts)) = crate::split::split_by(spec, cmd, &positions, |k| self.keeps(k)) {
            return Kept::Part(
                parts
                    .into_iter()
                    .filter(|(keep, _)| *keep)
                    .map(|(_, c)| c)
                    .collect(),
            );
        }
        let kept_at = |p: usize| self.keeps(cmd.arg(p));
        match spec.name {
            // Kept source, dropped destination: the source goes away.
            "rename" | "renamenx" if kept_at(1) && !kept_at(2) => {
                Kept::Part(vec![Command::from_args(&[b"DEL", cmd.arg(1)])])
            }
            "rpoplpush" | "brpoplpush" if kept_at(1) && !kept_at(2) => {
                Kept::Part(vec![Command::from_args(&[b"RPOP", cmd.arg(1)])])
            }
            "lmove" | "blmove" if cmd.argc() >= 5 && kept_at(1) && !kept_at(2) => {
                let pop: &[u8] = if cmd.arg(3).eq_ignore_ascii_case(b"left") {
                    b"LPOP"
                } else {
                    b"RPOP"
                };
                Kept::Part(vec![Command::from_args(&[pop, cmd.arg(1)])])
            }
            _ => Kept::Mixed,
        }
    }
}

/// Redis's glob matching (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`,
/// and `\` to escape.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last `*`: (pattern after it, string pos).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    if p == pattern.len() {
                        return true;
                    }
                    star = Some((p, i));
                    continue;
                }
                b'?' if i < s.len() => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' if i < s.len() => {
                    if let Some((matched, next)) = class_match(pattern, p, s[i]) {
                        if matched {
                            p = next;
                            i += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() && i < s.len() && pattern[p + 1] == s[i] => {
                    p += 2;
                    i += 1;
                    continue;
                }
                c if c != b'?' && c != b'[' && c != b'\\' && i < s.len() && c == s[i] => {
                    p += 1;
                    i += 1;
                    continue;
                }
                _ => {}
            }
        } else if i == s.len() {
            return true;
        }
        // Mismatch: let the last `*` swallow one more byte.
        match star {
            Some((sp, si)) if si < s.len() => {
                star = Some((sp, si + 1));
                p = sp;
                i = si + 1;
            }
            _ => return false,
        }
    }
}

/// Matches byte `c` against the class starting at `pattern[p] == '['`;
/// returns whether it matched and where the pattern continues.
fn class_match(pattern: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    let mut j = p + 1;
    let negate = pattern.get(j) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut matched = false;
    loop {
        let b = *pattern.get(j)?;
        if b == b']' {
            break;
        }
        if b == b'\\' && j + 1 < pattern.len() {
            matched |= pattern[j + 1] == c;
            j += 2;
        } else if pattern.get(j + 1) == Some(&b'-')
            && j + 2 < pattern.len()
            && pattern[j + 2] != b']'
        {
            let (mut lo, mut hi) = (b, pattern[j + 2]);
            if lo > hi {
                std::mem::swap(&mut lo, &mut hi);
            }
            matched |= (lo..=hi).contains(&c);
            j += 3;
        } else {
            matched |= b == c;
            j += 1;
        }
    }
    Some((matched != negate, j + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_copies_everything_in_place() {
        let f = DbFilter::all();
        assert_eq!(f.target_db(0), Some(0));
        assert_eq!(f.target_db(15), Some(15));
    }

    #[test]
    fn selection_and_mapping() {
        let f = DbFilter::new(vec![0, 3], BTreeMap::from([(3, 0), (0, 5)]));
        assert_eq!(f.target_db(0), Some(5));
        assert_eq!(f.target_db(3), Some(0));
        assert_eq!(f.target_db(1), None);
        let f = DbFilter::new(vec![], BTreeMap::from([(2, 7)]));
        assert_eq!(f.target_db(2), Some(7));
        assert_eq!(f.target_db(1), Some(1));
    }

    #[test]
    fn globs_match_as_redis_does() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("user:*", "user:1", true),
            ("user:*", "users:1", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*:session", "u:1:session", true),
            ("\\*x", "*x", true),
            ("\\*x", "ax", false),
            ("**a", "bba", true),
        ];
        for (pattern, s, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), s.as_bytes()),
                *want,
                "{pattern} {s}"
            );
        }
    }

    fn f(include: &[&str], exclude: &[&str]) -> KeyFilter {
        KeyFilter::new(
            include.iter().map(|p| KeyPattern::parse(p)).collect(),
            exclude.iter().map(|p| KeyPattern::parse(p)).collect(),
        )
    }

    fn keep(filter: &KeyFilter, args: &[&str]) -> Kept {
        let cmd = Command::from_args(args);
        filter.keep(command::lookup(&cmd), &cmd)
    }

    fn part(args: &[&[&str]]) -> Kept {
        Kept::Part(args.iter().map(|a| Command::from_args(a)).collect())
    }

    #[test]
    fn include_and_exclude_by_prefix_or_glob() {
        let filter = f(&["user:", "order:*"], &["user:tmp:*"]);
        assert!(filter.keeps(b"user:1"));
        assert!(filter.keeps(b"order:9"));
        assert!(!filter.keeps(b"user:tmp:3"));
        assert!(!filter.keeps(b"cache:1"));
        assert!(f(&[], &["cache:"]).keeps(b"user:1"));
    }

    #[test]
    fn commands_are_trimmed_to_the_kept_keys() {
        let filter = f(&["k"], &[]);
        assert_eq!(keep(&filter, &["SET", "k1", "v"]), Kept::All);
        assert_eq!(keep(&filter, &["SET", "x1", "v"]), Kept::Nothing);
        assert_eq!(keep(&filter, &["PING"]), Kept::All);
        assert_eq!(
            keep(&filter, &["DEL", "k1", "x", "k2"]),
            part(&[&["DEL", "k1", "k2"]])
        );
        assert_eq!(
            keep(&filter, &["MSET", "x", "1", "k1", "2"]),
            part(&[&["MSET", "k1", "2"]])
        );
        assert_eq!(
            keep(&filter, &["SMOVE", "x", "k1", "m"]),
            part(&[&["SADD", "k1", "m"]])
        );
        // Only reads kept keys: nothing to do.
        assert_eq!(
            keep(&filter, &["SUNIONSTORE", "x", "k1", "k2"]),
            Kept::Nothing
        );
        assert_eq!(keep(&filter, &["COPY", "k1", "x"]), Kept::Nothing);
        // Writes a kept key from dropped ones: no equivalent.
        assert_eq!(
            keep(&filter, &["SUNIONSTORE", "k1", "x", "k2"]),
            Kept::Mixed
        );
        assert_eq!(keep(&filter, &["RENAME", "x", "k1"]), Kept::Mixed);
        // A kept key moved away is gone.
        assert_eq!(
            keep(&filter, &["RENAME", "k1", "x"]),
            part(&[&["DEL", "k1"]])
        );
        assert_eq!(
            keep(&filter, &["LMOVE", "k1", "x", "LEFT", "RIGHT"]),
            part(&[&["LPOP", "k1"]])
        );
        assert_eq!(
            keep(&filter, &["RPOPLPUSH", "k1", "x"]),
            part(&[&["RPOP", "k1"]])
        );
    }
}
