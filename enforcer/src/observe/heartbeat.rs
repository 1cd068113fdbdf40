//! Liveness of the agent's long-running parts: each beats while it makes progress, and
//! `/healthz` fails naming the parts silent for longer than their bound. The control loop beats
//! on every turn, idle or not (it turns at least every 100 ms); a watcher beats on every event,
//! error and watch (re)start, and on every chunk the API server sends, bookmarks included (about
//! one a minute on a quiet watch), so a quiet cluster never looks stuck, and a hung connection
//! does.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// One part's last sign of life.
#[derive(Debug)]
pub struct Heartbeat {
    name: String,
    bound: Duration,
    last: Mutex<Instant>,
}

impl Heartbeat {
    /// Records progress now.
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    /// Records progress at `at` (tests freeze a heartbeat in the past with it).
    pub fn beat_at(&self, at: Instant) {
        if let Ok(mut last) = self.last.lock() {
            *last = at;
        }
    }

    /// Time since the last beat, at `now`.
    pub fn age(&self, now: Instant) -> Duration {
        self.last
            .lock()
            .map(|l| now.saturating_duration_since(*l))
            .unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Every registered heartbeat.
#[derive(Debug, Default)]
pub struct Heartbeats {
    beats: Mutex<Vec<Arc<Heartbeat>>>,
}

impl Heartbeats {
    /// A new heartbeat named `name` (as `/healthz` and `/metrics` say it), stale after `bound`
    /// without a beat; it counts as beating now.
    pub fn register(&self, name: impl Into<String>, bound: Duration) -> Arc<Heartbeat> {
        let hb = Arc::new(Heartbeat {
            name: name.into(),
            bound,
            last: Mutex::new(Instant::now()),
        });
        if let Ok(mut beats) = self.beats.lock() {
            beats.push(hb.clone());
        }
        hb
    }

    /// One line per heartbeat older than its bound at `now`: what is stuck, and for how long.
    pub fn stale(&self, now: Instant) -> Vec<String> {
        let Ok(beats) = self.beats.lock() else {
            return vec!["heartbeats unreadable (a thread panicked)".into()];
        };
        beats
            .iter()
            .filter_map(|hb| {
                let age = hb.age(now);
                (age > hb.bound).then(|| {
                    format!(
                        "{} stuck: no progress for {}s (bound {}s)",
                        hb.name,
                        age.as_secs(),
                        hb.bound.as_secs()
                    )
                })
            })
            .collect()
    }

    /// `enforcer_heartbeat_age_seconds{component}` for alerting before the probe fails.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let Ok(beats) = self.beats.lock() else {
            return;
        };
        if beats.is_empty() {
            return;
        }
        out.push_str(
            "# HELP enforcer_heartbeat_age_seconds Time since each part of the agent last made progress (/healthz fails past its bound)\n# TYPE enforcer_heartbeat_age_seconds gauge\n",
        );
        let now = Instant::now();
        for hb in beats.iter() {
            let _ = writeln!(
                out,
                "enforcer_heartbeat_age_seconds{{component=\"{}\"}} {:.3}",
                hb.name,
                hb.age(now).as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_stale_only_past_its_bound() {
        let beats = Heartbeats::default();
        let hb = beats.register("control loop", Duration::from_secs(30));
        let now = Instant::now();
        hb.beat_at(now);
        assert!(beats.stale(now + Duration::from_secs(30)).is_empty());
        assert_eq!(
            beats.stale(now + Duration::from_secs(31)),
            vec!["control loop stuck: no progress for 31s (bound 30s)".to_string()]
        );
        hb.beat_at(now + Duration::from_secs(31));
        assert!(beats.stale(now + Duration::from_secs(31)).is_empty());
    }
}
