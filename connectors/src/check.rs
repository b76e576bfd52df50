//! The report of `dongbo-agent check`, shared by every source kind: each prerequisite with what is
//! wrong and how to fix it, and warnings that do not fail the check.

use std::fmt;

/// One checked prerequisite.
#[derive(Debug, Clone)]
pub struct CheckItem {
    /// What was checked.
    pub what: String,
    /// What is wrong and how to fix it; `None` when fine.
    pub problem: Option<String>,
}

/// The outcome of every check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Checks in the order they ran.
    pub items: Vec<CheckItem>,
    /// What needs attention soon without being wrong yet: (what, why).
    pub warnings: Vec<(String, String)>,
}

impl CheckReport {
    /// Records a check that passed.
    pub fn ok(&mut self, what: impl Into<String>) {
        self.items.push(CheckItem { what: what.into(), problem: None });
    }

    /// Records a check that failed, with what is wrong and how to fix it.
    pub fn problem(&mut self, what: impl Into<String>, problem: impl Into<String>) {
        self.items.push(CheckItem { what: what.into(), problem: Some(problem.into()) });
    }

    /// Adds a check from outside this module (e.g. the hub connection).
    pub fn push(&mut self, item: CheckItem) {
        self.items.push(item);
    }

    /// The first problem, if any.
    pub fn first_problem(&self) -> Option<String> {
        self.items.iter().find_map(|i| i.problem.clone())
    }

    /// Records something that works today but needs attention soon (not a problem: `check` passes).
    pub fn warn(&mut self, what: impl Into<String>, why: impl Into<String>) {
        self.warnings.push((what.into(), why.into()));
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in &self.items {
            match &i.problem {
                None => writeln!(f, "ok       {}", i.what)?,
                Some(p) => writeln!(f, "PROBLEM  {}: {}", i.what, p)?,
            }
        }
        for (what, why) in &self.warnings {
            writeln!(f, "WARNING  {what}: {why}")?;
        }
        Ok(())
    }
}
