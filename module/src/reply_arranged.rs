//! Whether the command handler running now has arranged its client's reply some other way than
//! by what it returns: it blocked the client, took a slot in the client's output (see `held`), or
//! wrote the reply itself. A handler that then panics, or returns an error, must not have that
//! error sent as well: the client would get two replies for one command, and every later reply of
//! its pipeline would seem to answer the command before it.

use std::cell::Cell;

thread_local! {
    static ARRANGED: Cell<bool> = const { Cell::new(false) };
}

/// The running handler's reply is arranged: called wherever a client is blocked, given a slot
/// for its reply, or sent a reply.
pub fn mark() {
    ARRANGED.with(|a| a.set(true));
}

/// Runs a command handler `f`: its outcome, and whether it arranged its client's reply.
pub fn during<T>(f: impl FnOnce() -> T) -> (T, bool) {
    let outer = ARRANGED.with(|a| a.replace(false));
    let outcome = f();
    (outcome, ARRANGED.with(|a| a.replace(outer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_sees_only_its_own_arrangements() {
        mark();
        let (inner, outer) = during(|| during(mark).1);
        assert!(inner, "the inner handler arranged its reply");
        assert!(!outer, "the outer one did not");
        assert!(!during(|| ()).1);
        assert!(ARRANGED.with(|a| a.get()), "the flag outside any handler is as it was");
    }
}
