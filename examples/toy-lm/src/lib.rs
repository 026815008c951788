//! Library side of the `toy-lm` example: configuration, data, model, training loop,
//! comparison, plotting, progress display, generation and the command-line definition
//! ([`cli`]). `src/main.rs` runs the parsed commands.

pub mod cli;
pub mod compare;
pub mod config;
pub mod ddp;
pub mod data;
pub mod device;
pub mod generate;
pub mod model;
pub mod plot;
pub mod progress;
pub mod selection;
pub mod train;

/// Error type of the example: any error, with a readable message.
pub type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
