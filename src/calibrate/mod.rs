//! Calibration: the calibration set, the block runner and the statistics observer.

pub mod runner;
pub mod set;
pub mod stats;

pub use set::*;
