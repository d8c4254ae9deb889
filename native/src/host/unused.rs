//! The rest of the Proxy-Wasm SDK's imports: nothing in the filter calls them (shared queues,
//! gRPC, foreign functions). They exist because the SDK links them; each answers a status its
//! SDK wrapper maps to an error where it has one (`Ok` where it takes nothing else: any other
//! status panics the SDK).

use super::{INTERNAL_FAILURE, NOT_FOUND, OK};

#[no_mangle]
pub extern "C" fn proxy_register_shared_queue(_name: *const u8, _size: usize, _id: *mut u32) -> u32 {
    OK
}

#[no_mangle]
pub extern "C" fn proxy_resolve_shared_queue(_vm: *const u8, _vm_size: usize, _name: *const u8, _size: usize, _id: *mut u32) -> u32 {
    NOT_FOUND
}

#[no_mangle]
pub extern "C" fn proxy_dequeue_shared_queue(_queue: u32, _data: *mut *mut u8, _size: *mut usize) -> u32 {
    NOT_FOUND
}

#[no_mangle]
pub extern "C" fn proxy_enqueue_shared_queue(_queue: u32, _data: *const u8, _size: usize) -> u32 {
    NOT_FOUND
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn proxy_grpc_call(_u: *const u8, _us: usize, _s: *const u8, _ss: usize, _m: *const u8, _ms: usize, _i: *const u8, _is: usize, _d: *const u8, _ds: usize, _t: u32, _id: *mut u32) -> u32 {
    INTERNAL_FAILURE
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn proxy_grpc_stream(_u: *const u8, _us: usize, _s: *const u8, _ss: usize, _m: *const u8, _ms: usize, _i: *const u8, _is: usize, _id: *mut u32) -> u32 {
    INTERNAL_FAILURE
}

#[no_mangle]
pub extern "C" fn proxy_grpc_send(_token: u32, _data: *const u8, _size: usize, _end: bool) -> u32 {
    NOT_FOUND
}

#[no_mangle]
pub extern "C" fn proxy_grpc_cancel(_token: u32) -> u32 {
    NOT_FOUND
}

#[no_mangle]
pub extern "C" fn proxy_grpc_close(_token: u32) -> u32 {
    NOT_FOUND
}

#[no_mangle]
pub extern "C" fn proxy_get_status(_code: *mut u32, _data: *mut *mut u8, _size: *mut usize) -> u32 {
    OK
}

#[no_mangle]
pub extern "C" fn proxy_done() -> u32 {
    OK
}
