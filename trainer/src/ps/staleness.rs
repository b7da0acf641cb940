//! The staleness of the updates a parameter server applied in a stretch of time, from two
//! readings of its cumulative histogram: what the PS's event log shows as curves.

use std::collections::BTreeMap;

/// Mean and largest staleness (versions behind) of the updates in a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StalenessWindow {
    pub updates: u64,
    pub mean: f64,
    pub max: u64,
}

/// The updates in `now` that were not yet in `before` (both cumulative: versions behind →
/// updates). None when no update came in between.
pub fn window(before: &BTreeMap<u64, u64>, now: &BTreeMap<u64, u64>) -> Option<StalenessWindow> {
    let mut updates = 0u64;
    let mut sum = 0f64;
    let mut max = 0u64;
    for (&behind, &count) in now {
        let new = count.saturating_sub(before.get(&behind).copied().unwrap_or(0));
        if new > 0 {
            updates += new;
            sum += behind as f64 * new as f64;
            max = max.max(behind);
        }
    }
    (updates > 0).then(|| StalenessWindow {
        updates,
        mean: sum / updates as f64,
        max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_updates_since_the_last_reading_count() {
        let before = BTreeMap::from([(0, 10), (1, 5), (7, 1)]);
        let now = BTreeMap::from([(0, 12), (1, 5), (3, 2), (7, 1)]);
        assert_eq!(
            window(&before, &now),
            Some(StalenessWindow {
                updates: 4,
                mean: 1.5,
                max: 3
            })
        );
        assert_eq!(window(&now, &now), None);
        assert_eq!(window(&BTreeMap::new(), &BTreeMap::new()), None);
    }
}
