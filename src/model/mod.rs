//! Model descriptions that need no GPU: hyper-parameters ([`config`]) and exact parameter and
//! weight-byte counts ([`params`]).

pub mod config;
pub mod llama;
pub mod params;
pub mod source;
