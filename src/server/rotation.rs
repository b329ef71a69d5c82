//! Scheduled rotation (`keys[].rotate_after`): every key with a period gets a new version
//! once its newest version is that old.
//!
//! Each instance checks on its own; the keystore's compare-and-rotate
//! ([`KeyStore::rotate_if_due`](crate::keystore::KeyStore::rotate_if_due): "make N+1 only if
//! the newest is N and older than the period") lets exactly one of them make the version,
//! however many run. The decision reads the newest version's creation time from the token or
//! the key directory, so a restart neither rotates early nor skips a period (a server down for
//! several periods rotates once when it is back). Owns the check loop; knows nothing of how
//! keys are stored.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::keystore::ScheduledRotation;
use crate::name::KeyName;
use crate::server::service::Service;

/// How often keys are checked: a tenth of the shortest period, within these bounds. A version
/// is made at most one check interval after it is due.
const CHECK_MIN: Duration = Duration::from_millis(50);
const CHECK_MAX: Duration = Duration::from_secs(30);

/// How often the scheduler looks at `schedule`'s keys.
pub fn check_interval(schedule: &BTreeMap<KeyName, Duration>) -> Duration {
    schedule
        .values()
        .min()
        .map_or(CHECK_MAX, |p| *p / 10)
        .clamp(CHECK_MIN, CHECK_MAX)
}

/// Runs the schedule for as long as the service lives.
pub fn spawn(service: &Arc<Service>) {
    let service = Arc::downgrade(service);
    tokio::spawn(run(service));
}

async fn run(service: Weak<Service>) {
    let mut last_error: BTreeMap<KeyName, String> = BTreeMap::new();
    loop {
        let interval = match service.upgrade() {
            Some(s) => check_interval(&s.rotation_schedule()),
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(svc) = service.upgrade() else {
            return;
        };
        let schedule = svc.rotation_schedule();
        for (name, period) in schedule.iter() {
            match svc.rotate_if_due(name, *period).await {
                Ok(ScheduledRotation::Rotated(version)) => {
                    last_error.remove(name);
                    tracing::info!(key = %name, version, period = ?period, "rotated key on schedule (rotate_after)");
                }
                Ok(ScheduledRotation::NotDue) => {
                    last_error.remove(name);
                }
                Err(e) => {
                    // Once per distinct failure, not every check.
                    let text = e.to_string();
                    if last_error.get(name) != Some(&text) {
                        tracing::warn!(key = %name, error = %text, "scheduled rotation failed; retrying at the next check");
                        last_error.insert(name.clone(), text);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_follows_the_shortest_period() {
        let mut s = BTreeMap::new();
        assert_eq!(check_interval(&s), CHECK_MAX);
        s.insert(KeyName::new("a").unwrap(), Duration::from_secs(2));
        assert_eq!(check_interval(&s), Duration::from_millis(200));
        s.insert(KeyName::new("b").unwrap(), Duration::from_millis(10));
        assert_eq!(check_interval(&s), CHECK_MIN);
        s.clear();
        s.insert(KeyName::new("c").unwrap(), Duration::from_secs(90 * 86400));
        assert_eq!(check_interval(&s), CHECK_MAX);
    }
}
