//! When this node contributes: hours per weekday, in local time. Outside them it
//! serves only its own requests and its pool's devices, acquires nothing, and
//! tells peers (its announcements say it is not contributing, so their routes
//! leave it out).

use std::collections::BTreeMap;

use chrono::{Datelike, Timelike};
use serde::{Deserialize, Serialize};

/// Weekday keys, Monday first.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// Ranges one day may have.
const MAX_RANGES: usize = 24;

/// Hours `[start, end)` of a day, 0–24.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HourRange {
    /// First hour (0–23).
    pub start: u8,
    /// One past the last hour (1–24).
    pub end: u8,
}

/// The contribution schedule. Disabled (the default) means always.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Whether the hours apply at all.
    pub enabled: bool,
    /// Hours per weekday (`mon` … `sun`); a day left out has none.
    #[serde(default)]
    pub weekdays: BTreeMap<String, Vec<HourRange>>,
}

impl Schedule {
    /// Checks the days and hours; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        for (day, ranges) in &self.weekdays {
            if !WEEKDAYS.contains(&day.as_str()) {
                return Err(format!(
                    "unknown weekday '{day}' (use {})",
                    WEEKDAYS.join(", ")
                ));
            }
            if ranges.len() > MAX_RANGES {
                return Err(format!("{day}: at most {MAX_RANGES} ranges"));
            }
            for r in ranges {
                if r.start >= r.end || r.end > 24 {
                    return Err(format!(
                        "{day}: {}–{} is not a range of hours within 0–24",
                        r.start, r.end
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the node contributes at `weekday` (0 = Monday) and `hour`.
    pub fn contributes_at(&self, weekday: usize, hour: u32) -> bool {
        if !self.enabled {
            return true;
        }
        WEEKDAYS
            .get(weekday)
            .and_then(|d| self.weekdays.get(*d))
            .is_some_and(|ranges| {
                ranges
                    .iter()
                    .any(|r| u32::from(r.start) <= hour && hour < u32::from(r.end))
            })
    }

    /// Whether the node contributes now (local time).
    pub fn contributes_now(&self) -> bool {
        if !self.enabled {
            return true; // asked per served step: no clock read when off
        }
        let now = chrono::Local::now();
        self.contributes_at(now.weekday().num_days_from_monday() as usize, now.hour())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_apply_per_weekday_only_when_enabled() {
        let mut s = Schedule::default();
        assert!(s.contributes_at(2, 3));
        s.enabled = true;
        assert!(!s.contributes_at(2, 3), "no hours: never");
        s.weekdays
            .insert("wed".into(), vec![HourRange { start: 9, end: 17 }]);
        assert!(s.contributes_at(2, 9) && s.contributes_at(2, 16));
        assert!(!s.contributes_at(2, 17) && !s.contributes_at(1, 10));
        assert!(s.validate().is_ok());
        s.weekdays.insert("someday".into(), vec![]);
        assert!(s.validate().is_err());
        s.weekdays.remove("someday");
        s.weekdays
            .insert("mon".into(), vec![HourRange { start: 20, end: 8 }]);
        assert!(s.validate().is_err());
    }
}
