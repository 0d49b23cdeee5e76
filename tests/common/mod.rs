//! What the SIGKILL tests share: running this test binary as a child that
//! prints an `ack …` line for everything it acknowledged, and killing it at
//! a seeded random point.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A small seeded generator (SplitMix64): the kill points are reproducible.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// Where to kill the child: at once (while it starts) one time in
/// `at_once_one_in`, else after 1 to `max_acks` acknowledgements; then after
/// a random delay below `max_delay`.
pub(crate) struct KillPlan {
    pub(crate) at_once_one_in: u64,
    pub(crate) max_acks: u64,
    pub(crate) max_delay: Duration,
    /// How long the child may take to acknowledge before the test fails.
    pub(crate) patience: Duration,
}

/// Run the test `child_test` of this binary with `env`, kill it with SIGKILL
/// as `plan` says, and return what follows `ack ` on each line it printed
/// before it died, read or not.
pub(crate) fn run_and_kill(
    child_test: &str,
    env: &[(&str, &std::ffi::OsStr)],
    plan: &KillPlan,
    rng: &mut Rng,
) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            child_test,
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(ack) = line.strip_prefix("ack ")
                && tx.send(ack.to_owned()).is_err()
            {
                break;
            }
        }
    });
    let mut got = Vec::new();
    if rng.below(plan.at_once_one_in) != 0 {
        let wanted = 1 + rng.below(plan.max_acks);
        while got.len() < wanted as usize {
            match rx.recv_timeout(plan.patience) {
                Ok(ack) => got.push(ack),
                Err(e) => panic!("the child stopped acknowledging: {e}"),
            }
        }
    }
    let delay = u64::try_from(plan.max_delay.as_micros()).unwrap_or(u64::MAX);
    std::thread::sleep(Duration::from_micros(rng.below(delay.max(1))));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child ended by itself: {status}"
    );
    reader.join().unwrap();
    got.extend(rx.try_iter());
    got
}
