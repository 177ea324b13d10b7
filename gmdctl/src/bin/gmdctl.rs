//! gmdctl.
fn main() {}
