//! The shop end to end: starts the four services and one relay per service
//! database against the local environment, for the demo and the end-to-end tests.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
