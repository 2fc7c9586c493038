//! `ebb-control`: the scaler's pure core. Signals in, a plan out, the clock
//! passed in: no I/O, so the live scaler (`ebb-scaler`) and the trace
//! simulator (`ebb-sim`) execute exactly the same controller.
//!
//! # Layout
//! - [`config`]: the YAML config file, validated with errors naming the key.
//! - [`controller`]: [`controller::Controller::step`], which classifies
//!   workers, builds the observation, decides, replaces unhealthy workers,
//!   backs off a crash loop and picks which workers stop first.
//! - [`policy`]: the pure [`policy::decide`] and its inputs and outputs;
//!   [`target`]: its target-tracking stage (fleet sizing, panic mode);
//!   [`reason`]: why it chose its count; [`learned`]: timetable windows that
//!   learn their floor; [`miss_budget`]: whether the last worker may go.
//! - [`signals`]: arrivals, heartbeats and pool listings into an observation.
//! - [`listing`]: what a worker pool reports of its workers.

pub mod config;
pub mod controller;
pub mod learned;
pub mod listing;
pub mod miss_budget;
pub mod policy;
pub mod reason;
pub mod signals;
pub mod target;
