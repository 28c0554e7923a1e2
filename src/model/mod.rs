//! Model descriptions that need no GPU: hyper-parameters ([`config`]) and exact parameter and
//! weight-byte counts ([`params`]).

pub mod batch;
pub mod bert;
pub mod chat;
pub mod config;
pub mod generate;
pub mod gpt2;
pub mod layer;
pub mod llama;
pub mod load;
pub mod params;
pub mod planned;
pub mod source;
pub mod stream;
