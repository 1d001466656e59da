//! An agent's `/metrics` as tests read it: label sets built from shared parts, a scrape
//! waited for until a series reaches its count, and assertions that show the whole scrape
//! when they fail.

use std::{fmt, ops::Deref, time::Duration};

use anyhow::Result;

use crate::{cluster::NodeAgent, metric, wait_for, Agent};

/// An agent's admin endpoint, wherever it listens: a `SimNode`'s agent or a cluster
/// node's (reached from inside the node's network namespace).
pub trait AdminGet {
    /// GET `path`; the body, or an error unless 200.
    fn admin_get(&self, path: &str) -> Result<String>;
}

impl AdminGet for Agent {
    fn admin_get(&self, path: &str) -> Result<String> {
        Agent::get(self, path)
    }
}

impl AdminGet for NodeAgent {
    fn admin_get(&self, path: &str) -> Result<String> {
        NodeAgent::get(self, path)
    }
}

/// A label set for `metric`, from parts in order (e.g. the source's labels, then the
/// destination's); a later part's value replaces an earlier one's for the same key.
pub fn labels<'a>(parts: &[&[(&'a str, &'a str)]]) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for &(k, v) in parts.iter().flat_map(|p| p.iter()) {
        match out.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out
}

/// One `/metrics` text.
pub struct Scrape(pub String);

impl Scrape {
    /// `/metrics` of `agent` now (fails the test if the endpoint does not answer).
    pub fn of(agent: &impl AdminGet) -> Scrape {
        Scrape(agent.admin_get("/metrics").expect("GET /metrics"))
    }

    /// Scrapes `agent` until `done` holds of a scrape (fails the test after `timeout`,
    /// naming `what`); that scrape. A scrape that fails counts as empty.
    pub fn wait(
        agent: &impl AdminGet,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Scrape) -> bool,
    ) -> Scrape {
        let mut s = Scrape(String::new());
        wait_for(what, timeout, || {
            s.0 = agent.admin_get("/metrics").unwrap_or_default();
            done(&s)
        });
        s
    }

    /// The sum of the samples of `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        metric(&self.0, name, labels)
    }

    /// Asserts that `value(name, labels)` is `want`.
    #[track_caller]
    pub fn expect(&self, name: &str, labels: &[(&str, &str)], want: u64) {
        assert_eq!(
            self.value(name, labels),
            want,
            "{name} {labels:?} in:\n{}",
            self.0
        );
    }

    /// Asserts that `value(name, labels)` is at least `min`.
    #[track_caller]
    pub fn expect_at_least(&self, name: &str, labels: &[(&str, &str)], min: u64) {
        let got = self.value(name, labels);
        assert!(
            got >= min,
            "{name} {labels:?} is {got}, expected at least {min}, in:\n{}",
            self.0
        );
    }

    /// Prints the lines that start with one of `prefixes` (for `--nocapture` readers).
    pub fn show(&self, prefixes: &[&str]) {
        for l in self
            .0
            .lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        {
            eprintln!("{l}");
        }
    }
}

impl Deref for Scrape {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_parts_replace_earlier_values() {
        let base = [("reporter", "source"), ("destination_version", "v1")];
        assert_eq!(
            labels(&[
                &base,
                &[("destination_version", "v2"), ("response_code", "200")]
            ]),
            vec![
                ("reporter", "source"),
                ("destination_version", "v2"),
                ("response_code", "200")
            ]
        );
    }

    #[test]
    fn a_scrape_sums_the_matching_samples() {
        let s = Scrape(
            "x_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\nx_total_more 9\n".into(),
        );
        assert_eq!(s.value("x_total", &[("a", "1")]), 7);
        s.expect("x_total", &[("b", "3")], 4);
        s.expect_at_least("x_total", &[], 7);
    }
}
