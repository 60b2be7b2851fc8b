//! A trie over dot-separated words for topic-exchange binding patterns.
//!
//! Words are split on `.` like RabbitMQ does: the empty key has zero words, and every `.`
//! separates two (possibly empty) words, so `"a."` is `["a", ""]`. In a pattern, `*` matches
//! exactly one word and `#` zero or more. Consecutive `#` words are collapsed when a pattern is
//! inserted (`#.#` ≡ `#`), which keeps matching polynomial.

use std::collections::HashMap;

/// Topic binding patterns mapped to values (destinations), matched against routing keys by
/// walking the trie once per key rather than testing each pattern.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

/// The words of a key or pattern, RabbitMQ style (the empty string has none).
pub(crate) fn split_words(key: &str) -> impl Iterator<Item = &str> {
    let mut it = (!key.is_empty()).then(|| key.split('.'));
    std::iter::from_fn(move || it.as_mut()?.next())
}

/// The pattern's words with runs of `#` collapsed to one.
fn normalized(pattern: &str) -> impl Iterator<Item = &str> {
    let mut prev_hash = false;
    split_words(pattern).filter(move |w| {
        let is_hash = *w == "#";
        let keep = !(is_hash && prev_hash);
        prev_hash = is_hash;
        keep
    })
}

/// Split off the first word of a non-empty remainder; `None` means no words are left.
#[inline]
fn next_word(rest: &str) -> (&str, Option<&str>) {
    match rest.split_once('.') {
        Some((w, tail)) => (w, Some(tail)),
        None => (rest, None),
    }
}

impl<T> TopicTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (pattern, value) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add `value` under `pattern` (duplicates are kept; each needs its own `remove`).
    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = &mut self.root;
        for w in normalized(pattern) {
            node = match w {
                "#" => node.hash.get_or_insert_with(Box::default),
                "*" => node.star.get_or_insert_with(Box::default),
                _ => node.words.entry(w.into()).or_default(),
            };
        }
        node.values.push(value);
        self.len += 1;
    }

    /// Remove one `value` stored under `pattern`; returns whether one was found. Empty branches
    /// are pruned.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool
    where
        T: PartialEq,
    {
        let words: Vec<&str> = normalized(pattern).collect();
        let removed = Self::remove_at(&mut self.root, &words, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<T>, words: &[&str], value: &T) -> bool
    where
        T: PartialEq,
    {
        let Some((first, rest)) = words.split_first() else {
            let Some(i) = node.values.iter().position(|v| v == value) else {
                return false;
            };
            node.values.remove(i);
            return true;
        };
        match *first {
            "#" | "*" => {
                let slot = if *first == "#" {
                    &mut node.hash
                } else {
                    &mut node.star
                };
                let Some(child) = slot.as_deref_mut() else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, value);
                if child.is_empty() {
                    *slot = None;
                }
                removed
            }
            w => {
                let Some(child) = node.words.get_mut(w) else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, value);
                if child.is_empty() {
                    node.words.remove(w);
                }
                removed
            }
        }
    }

    /// Call `f` for every value whose pattern matches `key`. A value reachable through several
    /// paths (e.g. `#.a.#` against `a.a`) is reported more than once; callers de-duplicate.
    pub fn for_each_match<'a, F: FnMut(&'a T)>(&'a self, key: &str, f: &mut F) {
        self.for_each_match_counted(key, f);
    }

    /// [`for_each_match`](Self::for_each_match) that also returns how many trie nodes the walk
    /// visited: a measure of the matching cost, which depends on the key and on the patterns
    /// that share its words, not on the number of bindings.
    pub fn for_each_match_counted<'a, F: FnMut(&'a T)>(&'a self, key: &str, f: &mut F) -> usize {
        let rest = (!key.is_empty()).then_some(key);
        let mut visited = 0;
        Self::walk(&self.root, rest, f, &mut visited);
        visited
    }

    fn walk<'a, F: FnMut(&'a T)>(
        node: &'a Node<T>,
        rest: Option<&str>,
        f: &mut F,
        visited: &mut usize,
    ) {
        *visited += 1;
        if let Some(h) = node.hash.as_deref() {
            // `#` swallows zero, one, … or all of the remaining words.
            let mut r = rest;
            loop {
                Self::walk(h, r, f, visited);
                match r {
                    None => break,
                    Some(s) => r = next_word(s).1,
                }
            }
        }
        match rest {
            None => node.values.iter().for_each(&mut *f),
            Some(s) => {
                let (w, tail) = next_word(s);
                if let Some(child) = node.words.get(w) {
                    Self::walk(child, tail, f, visited);
                }
                if let Some(child) = node.star.as_deref() {
                    Self::walk(child, tail, f, visited);
                }
            }
        }
    }
}

/// The reference matcher: does `pattern` match `key`? (Used by tests and by callers that hold
/// one pattern.)
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = split_words(pattern).collect();
    let k: Vec<&str> = split_words(key).collect();
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((w, rest)) => match k.split_first() {
                None => false,
                Some((kw, krest)) => (*w == "*" || w == kw) && go(rest, krest),
            },
        }
    }
    go(&p, &k)
}
