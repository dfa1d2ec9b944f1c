//! Empty library target so build-dependency resolution is happy; the
//! programs are the `gatekeeper` binary target of this crate.
#![no_std]
