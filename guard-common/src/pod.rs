// SAFETY (all impls): `#[repr(C)]`, only fixed-width integer fields and
// explicit padding, so every bit pattern is valid and there is no hidden
// padding; sizes are asserted next to each type.
unsafe impl aya::Pod for crate::LiveConfig {}
unsafe impl aya::Pod for crate::SourceState {}
unsafe impl aya::Pod for crate::BlockEntry {}
unsafe impl aya::Pod for crate::OverCapEvent {}
unsafe impl aya::Pod for crate::TokenBucket {}
unsafe impl aya::Pod for crate::syncookie::CookieKey {}
unsafe impl aya::Pod for crate::syncookie::CookieState {}
unsafe impl aya::Pod for crate::state::InFlight {}
unsafe impl aya::Pod for crate::state::FlowKey {}
unsafe impl aya::Pod for crate::state::Handshake {}
