//! GeoMessage: reliable, ordered, authenticated request/reply messaging between
//! machines over one or more UDP networks.
//!
//! This crate knows nothing about devices or state maps; the mirror engine in
//! `gmd-core` is driven by `gmdd`, which connects the two.
