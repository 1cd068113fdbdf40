#![no_std]
// This file exists to enable the library target, so that `enforcer` can have this crate as a
// build-dependency (cargo then rebuilds the agent when the programs change).
