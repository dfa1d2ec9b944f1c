//! Builds the eBPF programs (`gatekeeper-ebpf`) with the nightly toolchain
//! and bpf-linker; `cargo xtask setup` installs both.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "gatekeeper-ebpf")
        .ok_or_else(|| anyhow!("gatekeeper-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent"))?;
    aya_build::build_ebpf(
        [Package { name: "gatekeeper-ebpf", root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
}
