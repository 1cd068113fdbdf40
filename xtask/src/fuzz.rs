//! `cargo xtask fuzz`: the frame property test (`enforcer/tests/frame_props.rs`) for longer than
//! CI runs it: random and mutated frames through the real programs (`BPF_PROG_TEST_RUN`),
//! checked against the userspace model of what policy allows. Needs root.

use anyhow::Result;

/// Runs `cases` cases from `seed` (a new one from the clock when none is given, printed so a
/// failure can be replayed); `strict`: the model does not tolerate the programs' known
/// deviations.
pub fn fuzz(cases: u64, seed: Option<u64>, strict: bool) -> Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    println!("cargo xtask fuzz: {cases} cases from seed {seed}");
    let mut cmd = super::cargo();
    cmd.args([
        "test",
        "--release",
        "-p",
        "enforcer",
        "--test",
        "frame_props",
        "--",
        "--include-ignored",
        "--nocapture",
        "random_frames",
    ])
    .env("ENFORCER_FUZZ_CASES", cases.to_string())
    .env("ENFORCER_FUZZ_SEED", seed.to_string())
    .env("ENFORCER_FUZZ_STRICT", if strict { "1" } else { "0" });
    super::status(cmd, "the frame property test")
}
