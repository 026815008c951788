//! Progress of a training run: on a terminal a bar with the step, the rate and the time left
//! (the log lines print above it); anywhere else (a file, a pipe, CI) the plain log lines
//! alone, so logs stay greppable.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A run's progress display.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Steps `start..steps` of the run labelled `label`; a bar only when stdout is a terminal.
    pub fn new(label: &str, start: usize, steps: usize) -> Self {
        if !std::io::stdout().is_terminal() || start >= steps {
            return Self { bar: None };
        }
        let bar = ProgressBar::new(steps as u64);
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps | {msg} | {per_sec} | ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        bar.set_position(start as u64);
        Self { bar: Some(bar) }
    }

    /// Prints a log line (above the bar when there is one).
    pub fn line(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => println!("{msg}"),
        }
    }

    /// Marks step `done` as finished; `msg` (e.g. the loss) shows on the bar.
    pub fn step(&self, done: usize, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(msg.to_string());
        }
    }

    /// Removes the bar (the log lines stay).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
