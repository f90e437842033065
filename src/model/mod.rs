//! What flows through weir, and the ports it flows through: shapes every layer above may use,
//! importing nothing of the runtime.

pub mod checkpoints;
pub mod event;
pub mod fence;
pub mod message;
pub mod port;
pub mod reading;
pub mod time;
pub mod trace;
