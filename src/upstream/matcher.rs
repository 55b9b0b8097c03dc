//! Topic → subscription ids for connections whose broker tags no message with subscription
//! identifiers (MQTT 3.1.1, or an MQTT 5 broker without them): a level trie over the filters
//! one connection holds, matched with MQTT's rules (`+` one level, `#` the rest including
//! none, wildcards at the first level never match a `$` topic).
//!
//! Matching costs the topic's depth times the wildcard branches met on the way, not the number
//! of filters: a namespace with 10,000 rooms costs the same per message as one with ten.

use std::collections::HashMap;

/// Filters (each with its router id) of one upstream connection.
#[derive(Debug, Default)]
pub struct Matcher {
    root: Node,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// The id of the filter that ends at this node.
    exact: Option<usize>,
    /// The id of the filter that ends with `#` below this node.
    hash: Option<usize>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_none()
            && self.hash.is_none()
    }
}

impl Matcher {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds `filter` with `id`, or gives it a new id. Returns the id it had.
    pub fn insert(&mut self, filter: &str, id: usize) -> Option<usize> {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let slot = loop {
            let Some(level) = levels.next() else {
                break &mut node.exact;
            };
            match level {
                "#" if levels.peek().is_none() => break &mut node.hash,
                "+" => node = node.plus.get_or_insert_with(Box::default),
                _ => node = node.children.entry(level.into()).or_default(),
            }
        };
        let old = slot.replace(id);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `filter`. Returns its id.
    pub fn remove(&mut self, filter: &str) -> Option<usize> {
        let levels: Vec<&str> = filter.split('/').collect();
        let old = remove_in(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The id `filter` has.
    pub fn get(&self, filter: &str) -> Option<usize> {
        let mut node = &self.root;
        let mut levels = filter.split('/').peekable();
        loop {
            let Some(level) = levels.next() else {
                return node.exact;
            };
            node = match level {
                "#" if levels.peek().is_none() => return node.hash,
                "+" => node.plus.as_deref()?,
                _ => node.children.get(level)?,
            };
        }
    }

    /// Appends the id of every filter matching `topic` to `out`.
    pub fn matches(&self, topic: &str, out: &mut Vec<usize>) {
        if self.len == 0 {
            return;
        }
        let mut levels = topic.split('/');
        let Some(first) = levels.next() else {
            return;
        };
        if first.starts_with('$') {
            // MQTT: a filter starting with a wildcard does not match a `$` topic.
            if let Some(child) = self.root.children.get(first) {
                walk(child, levels, out);
            }
            return;
        }
        step(&self.root, first, levels, out);
    }
}

/// Matches `level` (and then `rest`) below `node`.
fn step<'t>(node: &Node, level: &'t str, rest: std::str::Split<'t, char>, out: &mut Vec<usize>) {
    if let Some(id) = node.hash {
        out.push(id);
    }
    if let Some(child) = node.children.get(level) {
        walk(child, rest.clone(), out);
    }
    if let Some(plus) = node.plus.as_deref() {
        walk(plus, rest, out);
    }
}

/// `node` has consumed the levels before `rest`.
fn walk<'t>(node: &Node, mut rest: std::str::Split<'t, char>, out: &mut Vec<usize>) {
    match rest.next() {
        // `a/#` matches `a` too.
        None => out.extend(node.exact.into_iter().chain(node.hash)),
        Some(level) => step(node, level, rest, out),
    }
}

fn remove_in(node: &mut Node, levels: &[&str]) -> Option<usize> {
    let Some((level, rest)) = levels.split_first() else {
        return node.exact.take();
    };
    if *level == "#" && rest.is_empty() {
        return node.hash.take();
    }
    if *level == "+" {
        let child = node.plus.as_deref_mut()?;
        let old = remove_in(child, rest);
        if child.is_empty() {
            node.plus = None;
        }
        return old;
    }
    let child = node.children.get_mut(*level)?;
    let old = remove_in(child, rest);
    if child.is_empty() {
        node.children.remove(*level);
    }
    old
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    #[test]
    fn mqtt_matching_rules() {
        let mut m = Matcher::default();
        for (i, f) in [
            "a/b", "a/+", "a/#", "#", "+/b", "a/b/c", "+", "$SYS/#", "a//c",
        ]
        .iter()
        .enumerate()
        {
            m.insert(f, i);
        }
        let hits = |m: &Matcher, t: &str| {
            let mut v = Vec::new();
            m.matches(t, &mut v);
            v.sort();
            v
        };
        assert_eq!(hits(&m, "a/b"), [0, 1, 2, 3, 4]);
        assert_eq!(hits(&m, "a"), [2, 3, 6]);
        assert_eq!(hits(&m, "a/b/c"), [2, 3, 5]);
        assert_eq!(hits(&m, "$SYS/x"), [7]);
        assert_eq!(hits(&m, "a//c"), [2, 3, 8]);
        assert_eq!(m.get("a/+"), Some(1));
        assert_eq!(m.remove("a/#"), Some(2));
        assert_eq!(m.remove("a/#"), None);
        assert_eq!(hits(&m, "a/b/c"), [3, 5]);
    }

    /// The reference: one filter against one topic, level by level (MQTT 3.1.1 §4.7).
    fn reference(topic: &str, filter: &str) -> bool {
        let mut topics = topic.split('/');
        let mut first = true;
        for f in filter.split('/') {
            let wild = f == "#" || f == "+";
            if first && wild && topic.starts_with('$') {
                return false;
            }
            first = false;
            if f == "#" {
                return true;
            }
            match topics.next() {
                Some(t) if f == "+" || f == t => {}
                _ => return false,
            }
        }
        topics.next().is_none()
    }

    /// Random filters and topics over a small alphabet, inserted, re-numbered and removed at
    /// random: the trie agrees with matching every filter one by one. `CUTTLE_MATCHER_SEED`
    /// replays one seed.
    #[test]
    fn agrees_with_matching_each_filter() {
        let seeds: Vec<u64> = match std::env::var("CUTTLE_MATCHER_SEED") {
            Ok(s) => vec![s.parse().expect("CUTTLE_MATCHER_SEED is a number")],
            Err(_) => (1..=16).collect(),
        };
        for seed in seeds {
            run(seed);
        }
    }

    fn run(seed: u64) {
        let mut rng = Rng::new(seed);
        const WILD: [&str; 6] = ["a", "b", "", "$x", "+", "#"];
        let level = |rng: &mut Rng, wild: bool| -> &'static str {
            let levels = if wild { &WILD[..] } else { &WILD[..4] };
            levels[rng.below(levels.len())]
        };
        let mut m = Matcher::default();
        let mut model: HashMap<String, usize> = HashMap::new();
        for step in 0..2000 {
            let depth = 1 + rng.below(4);
            let mut filter: Vec<&str> = (0..depth).map(|_| level(&mut rng, true)).collect();
            if let Some(pos) = filter.iter().position(|l| *l == "#") {
                filter.truncate(pos + 1); // `#` only last
            }
            let filter = filter.join("/");
            if rng.chance(3) {
                assert_eq!(
                    m.remove(&filter),
                    model.remove(&filter),
                    "seed {seed} step {step}"
                );
            } else {
                let id = rng.below(1000);
                let old = model.insert(filter.clone(), id);
                assert_eq!(m.insert(&filter, id), old, "seed {seed} step {step}");
            }
            assert_eq!(m.len(), model.len(), "seed {seed} step {step}");
            assert_eq!(m.get(&filter), model.get(&filter).copied(), "seed {seed}");
            let depth = 1 + rng.below(4);
            let topic: Vec<&str> = (0..depth).map(|_| level(&mut rng, false)).collect();
            let topic = topic.join("/");
            let mut got = Vec::new();
            m.matches(&topic, &mut got);
            got.sort();
            let mut want: Vec<usize> = model
                .iter()
                .filter(|(f, _)| reference(&topic, f))
                .map(|(_, id)| *id)
                .collect();
            want.sort();
            assert_eq!(
                got, want,
                "seed {seed} step {step}: topic {topic:?} in {model:?}"
            );
        }
    }
}
