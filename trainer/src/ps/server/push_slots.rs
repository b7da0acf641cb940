//! How many pushes a PS receives at once, in all and per connection. A push holds up to a
//! shard's worth of memory while it arrives, so these counts bound the PS's memory: a
//! flood of push heads, even with the job's token, gets RESOURCE_EXHAUSTED at once
//! instead of a buffer each. A refused push has read nothing, so it has changed nothing;
//! a worker that meets one pushes again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// Pushes one connection may have in flight: a worker sends one per PS at a time, and the
/// next may start while the last is being answered.
pub(super) const PER_CONNECTION: usize = 2;

/// Pushes beyond every worker's own: a restarted worker's push may overlap its old
/// connection's, and a retried one its timed-out first try.
pub(super) const SPARE: usize = 2;

#[derive(Debug)]
pub(super) struct PushSlots {
    total: usize,
    per_connection: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    all: usize,
    by_connection: HashMap<SocketAddr, usize>,
}

/// One push's place; given back when the push ends, however it ends.
#[derive(Debug)]
pub(super) struct Slot {
    slots: Arc<PushSlots>,
    connection: Option<SocketAddr>,
}

impl PushSlots {
    /// Room for `workers` + [`SPARE`] pushes, [`PER_CONNECTION`] on any one connection.
    pub(super) fn for_workers(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            total: workers + SPARE,
            per_connection: PER_CONNECTION,
            taken: Mutex::new(Taken::default()),
        })
    }

    /// A slot for a push from `connection` (its peer address; None when unknown, which
    /// counts against the total only), or why there is none.
    pub(super) fn take(self: &Arc<Self>, connection: Option<SocketAddr>) -> Result<Slot, Status> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if taken.all >= self.total {
            return Err(Status::resource_exhausted(format!(
                "{} pushes are arriving already, as many as this PS takes at once (the job's workers + {SPARE}); push again",
                taken.all
            )));
        }
        if let Some(peer) = connection {
            let mine = taken.by_connection.entry(peer).or_default();
            if *mine >= self.per_connection {
                return Err(Status::resource_exhausted(format!(
                    "{mine} pushes from {peer} are arriving already, as many as one connection may send at once; push again"
                )));
            }
            *mine += 1;
        }
        taken.all += 1;
        Ok(Slot {
            slots: self.clone(),
            connection,
        })
    }

    #[cfg(test)]
    fn taken(&self) -> usize {
        self.taken.lock().unwrap().all
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.slots.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.all -= 1;
        if let Some(peer) = self.connection
            && let Some(mine) = taken.by_connection.get_mut(&peer)
        {
            *mine -= 1;
            if *mine == 0 {
                // Connections come and go; the map holds only those with a push arriving.
                taken.by_connection.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn one_connection_gets_two_slots_and_the_job_its_workers_plus_two() {
        let slots = PushSlots::for_workers(2);
        let a1 = slots.take(peer(1)).unwrap();
        let _a2 = slots.take(peer(1)).unwrap();
        let refused = slots.take(peer(1)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("127.0.0.1:1"), "{refused:?}");
        let _b = slots.take(peer(2)).unwrap();
        let _unknown = slots.take(None).unwrap();
        // 4 = 2 workers + 2 spare: a fifth connection is refused too.
        let refused = slots.take(peer(3)).unwrap_err();
        assert!(refused.message().contains("workers + 2"), "{refused:?}");
        drop(a1);
        assert_eq!(slots.taken(), 3);
        let _a3 = slots.take(peer(1)).unwrap();
    }

    #[test]
    fn slots_come_back_when_pushes_end_and_leave_no_trace_of_the_connection() {
        let slots = PushSlots::for_workers(1);
        for port in 0..1000 {
            let _slot = slots.take(peer(port)).unwrap();
        }
        assert_eq!(slots.taken(), 0);
        assert!(slots.taken.lock().unwrap().by_connection.is_empty());
    }
}
