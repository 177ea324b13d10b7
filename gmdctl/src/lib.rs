//! Control protocol shared by gmdd, gmdctl and gmdstat.
