//! A gate that one action waits behind until it opens, on whichever thread opens it.
//!
//! A follower forwards a client's pipeline to the leader in batches (see `transaction`), and a
//! MULTI in the middle of a pipeline splits it: the commands before it go at once, the
//! transaction with the rest at the end of the event-loop turn. Two batches in flight together
//! are not ordered on the way (each takes its own connection), and a batch of reads is served
//! through a leadership check that does not wait for a write still being committed: the second
//! batch waits behind the first one's gate, which opens once its replies are in.

use std::sync::{Arc, Mutex};

type Action = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct Gate(Arc<Mutex<State>>);

enum State {
    Closed(Option<Action>),
    Open,
}

impl Gate {
    pub fn closed() -> Gate {
        Gate(Arc::new(Mutex::new(State::Closed(None))))
    }

    /// Runs `action` now if the gate is open, else once it opens. One action waits at most: a
    /// second one would replace it.
    pub fn then(&self, action: Action) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            State::Open => {
                drop(state);
                action();
            }
            State::Closed(waiting) => *waiting = Some(action),
        }
    }

    fn open(&self) {
        let previous = std::mem::replace(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()), State::Open);
        if let State::Closed(Some(action)) = previous {
            action();
        }
    }
}

/// Opens its gate when dropped: however the batch it goes with ends (answered, failed, or never
/// sent), what waits behind it goes on.
pub struct OpensOnDrop(pub Gate);

impl Drop for OpensOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_action_runs_once_when_the_gate_opens_or_at_once_if_it_is_open() {
        let runs = Arc::new(AtomicUsize::new(0));
        let count = |runs: &Arc<AtomicUsize>| {
            let runs = runs.clone();
            Box::new(move || {
                runs.fetch_add(1, Ordering::SeqCst);
            })
        };
        let gate = Gate::closed();
        gate.then(count(&runs));
        assert_eq!(runs.load(Ordering::SeqCst), 0, "waits while closed");
        drop(OpensOnDrop(gate.clone()));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        gate.then(count(&runs));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "runs at once when open");
        drop(OpensOnDrop(gate));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "opening again runs nothing");
    }
}
