//! The harness itself, where the machine running the tests can get in its way.

use raftis_integration::{free_port_pair, Server};
use std::process::Command;

/// A socket read with a timeout fails with EINTR when the process is stopped and continued,
/// which happened to a CI run once. `Server::cmd` must wait on for the reply instead of failing.
/// This binary holds only this test, since it stops the whole test process.
#[test]
fn a_command_survives_the_test_process_being_stopped_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_plain(free_port_pair(), dir.path()).unwrap();
    let pid = std::process::id();
    let mut stopper =
        Command::new("sh").arg("-c").arg(format!("sleep 0.3; kill -STOP {pid}; sleep 0.3; kill -CONT {pid}")).spawn().unwrap();

    let reply: String = server.cmd(&["DEBUG", "SLEEP", "1"]).expect("the reply, read through the stop");

    assert_eq!(reply, "OK");
    assert!(stopper.wait().unwrap().success(), "the stopper could not signal the test process");
}
