//! gmdstat.
fn main() {}
