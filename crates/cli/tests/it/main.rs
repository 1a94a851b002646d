//! End-to-end tests: the real server on 127.0.0.1 with a temp data dir, real Delta files,
//! real fsync. One binary for the crate (link time); modules by concern.

mod browser;
mod cascades;
mod common;
mod crash;
mod dims;
mod features;
mod ingest_http;
mod ops;
mod outside_reader;
mod pg;
mod privacy;
mod retention;
mod scaleout;
mod security;
mod warehouse;
mod workload_counts;
