//! The subcommands' bodies; `main.rs` holds the argument definitions and the dispatch.

pub(crate) mod bench;
pub(crate) mod device;
pub(crate) mod generate;
pub(crate) mod load;
pub(crate) mod plan;

pub(crate) use bench::*;
pub(crate) use device::*;
pub(crate) use generate::*;
pub(crate) use load::*;
pub(crate) use plan::*;
