//! The demo data's identities that more than one service knows: the customers Ada
//! and Bob live in the customer service, and the auth service links its demo users
//! to them. Both take the ids from here, so the two seeds cannot drift apart
//! without one crate depending on the other.

use uuid::Uuid;

/// Demo customer Ada, credit limit 1000.00.
pub const ADA: Uuid = Uuid::from_u128(0xc001);

/// Demo customer Bob, credit limit 50.00 (a larger order exceeds it).
pub const BOB: Uuid = Uuid::from_u128(0xc002);
