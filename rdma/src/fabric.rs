//! A small safe wrapper over libfabric: each type owns one libfabric object and closes it on drop.
//!
//! ```text
//!   Info ─▶ Fabric ─▶ Domain ─┬─▶ CompletionQueue ─┐
//!                             ├─▶ AddressVector ───┼─▶ Endpoint
//!                             └─▶ MemoryRegion     │
//! ```
//!
//! Children hold an `Arc` of their parent, so a parent is closed only after every child: an
//! endpoint before its queue and address vector, those and every memory region before the
//! domain, the domain before the fabric. None of these types is `Sync`: libfabric is opened with
//! `FI_THREAD_DOMAIN`, which asks the application to serialise calls on a domain, and the channel
//! makes every call from its one poller thread. They are `Send`, because libfabric objects are not
//! tied to the thread that created them.

use std::ffi::{c_void, CStr, CString};
use std::mem::ManuallyDrop;
use std::ptr;
use std::sync::{Arc, Mutex};

use fmi_fabric_sys as sys;

/// Errors from libfabric, each naming the provider and the call that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FabricError {
    /// `fi_getinfo` found no provider matching the request.
    #[error(
        "libfabric: fi_getinfo found no {wanted} endpoint for provider {provider} ({detail}); \
         run `fi_info -p '{provider}' -t FI_EP_RDM` to see what is available, pick another \
         provider with rdma.provider / FMI_RDMA_PROVIDER, or unset FI_PROVIDER"
    )]
    NoProvider {
        /// The provider asked for (`"any"` when none was named).
        provider: String,
        /// What was asked for (endpoint type and capabilities).
        wanted: &'static str,
        /// libfabric's message.
        detail: String,
    },
    /// A libfabric call returned an error.
    #[error("libfabric provider {provider}: {call} failed: {message} (error {code})")]
    Call {
        /// The provider in use.
        provider: String,
        /// The call that failed.
        call: &'static str,
        /// The (positive) libfabric error number.
        code: i32,
        /// libfabric's description of it.
        message: String,
    },
    /// A peer's endpoint name is malformed.
    #[error("libfabric provider {provider}: invalid endpoint name: {detail}")]
    BadName {
        /// The provider in use.
        provider: String,
        /// What is wrong with it.
        detail: String,
    },
}

/// The text of a libfabric error number (positive or negative).
pub fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a pointer to a static string for any value.
    let s = unsafe { sys::fi_strerror(code.abs()) };
    if s.is_null() {
        return format!("error {code}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

fn check(provider: &str, call: &'static str, rc: isize) -> Result<(), FabricError> {
    if rc >= 0 {
        Ok(())
    } else {
        let code = i32::try_from(-rc).unwrap_or(i32::MAX);
        Err(FabricError::Call {
            provider: provider.to_owned(),
            call,
            code,
            message: strerror(code),
        })
    }
}

/// What to ask libfabric for.
#[derive(Clone, Debug, Default)]
pub struct Hints {
    /// The provider name (`"shm"`, `"tcp;ofi_rxm"`, `"verbs;ofi_rxm"`, `"efa"`, `"cxi"`), or any.
    pub provider: Option<String>,
    /// Whether RMA (`fi_read`) is required.
    pub rma: bool,
}

/// The memory-registration modes this wrapper supports and declares in its hints; the provider
/// answers with the subset it requires (see [`Info::mr_mode`]).
pub const SUPPORTED_MR_MODE: u32 = sys::FI_MR_LOCAL
    | sys::FI_MR_VIRT_ADDR
    | sys::FI_MR_ALLOCATED
    | sys::FI_MR_PROV_KEY
    | sys::FI_MR_ENDPOINT;

/// The libfabric API version this wrapper is written against (1.10, present in every 1.x ≥ 1.10
/// and in 2.x).
const API_VERSION: u32 = sys::make_version(1, 10);

/// The list `fi_getinfo` returned (owned; freed with `fi_freeinfo`).
pub struct InfoList {
    head: *mut sys::fi_info,
}

// SAFETY: an fi_info list is plain heap memory owned by this value.
unsafe impl Send for InfoList {}

impl InfoList {
    /// Queries the RDM + tagged endpoints matching `hints`.
    pub fn query(hints: &Hints) -> Result<InfoList, FabricError> {
        let named = hints.provider.clone().unwrap_or_else(|| "any".to_owned());
        let wanted = if hints.rma {
            "FI_EP_RDM with FI_TAGGED and FI_RMA"
        } else {
            "FI_EP_RDM with FI_TAGGED"
        };
        // SAFETY: fi_allocinfo returns a zeroed fi_info with its attribute structs allocated, or
        // null; every pointer written below belongs to it and fi_freeinfo frees them all.
        let h = unsafe { sys::fi_allocinfo() };
        if h.is_null() {
            return Err(FabricError::Call {
                provider: named,
                call: "fi_allocinfo",
                code: 12,
                message: strerror(12),
            });
        }
        let mut caps = u64::from(sys::FI_TAGGED) | u64::from(sys::FI_MSG);
        if hints.rma {
            caps |=
                u64::from(sys::FI_RMA) | u64::from(sys::FI_READ) | u64::from(sys::FI_REMOTE_READ);
        }
        let prov_name = match &hints.provider {
            Some(p) => match CString::new(p.as_str()) {
                Ok(c) => Some(c),
                Err(_) => {
                    // SAFETY: h came from fi_allocinfo.
                    unsafe { sys::fi_freeinfo(h) };
                    return Err(FabricError::NoProvider {
                        provider: named,
                        wanted,
                        detail: "the provider name contains a NUL byte".to_owned(),
                    });
                }
            },
            None => None,
        };
        // SAFETY: h and its attribute pointers are valid (fi_allocinfo). The provider name must be
        // malloc'ed (strdup) because fi_freeinfo frees it.
        unsafe {
            (*h).caps = caps;
            (*h).mode = sys::FI_CONTEXT | sys::FI_CONTEXT2;
            (*(*h).ep_attr).type_ = sys::fi_ep_type_FI_EP_RDM;
            let d = (*h).domain_attr;
            (*d).mr_mode = SUPPORTED_MR_MODE as i32;
            (*d).threading = sys::fi_threading_FI_THREAD_DOMAIN;
            (*d).av_type = sys::fi_av_type_FI_AV_TABLE;
            if let Some(c) = &prov_name {
                (*(*h).fabric_attr).prov_name = libc_strdup(c);
            }
        }
        let mut out: *mut sys::fi_info = ptr::null_mut();
        // SAFETY: h is a valid hints struct; out receives an owned list or stays null.
        let rc = unsafe { sys::fi_getinfo(API_VERSION, ptr::null(), ptr::null(), 0, h, &mut out) };
        // SAFETY: h came from fi_allocinfo and is not used again.
        unsafe { sys::fi_freeinfo(h) };
        if rc != 0 || out.is_null() {
            return Err(FabricError::NoProvider {
                provider: named,
                wanted,
                detail: if rc == 0 {
                    "empty list".to_owned()
                } else {
                    strerror(rc)
                },
            });
        }
        Ok(InfoList { head: out })
    }

    /// The entries, in libfabric's order of preference.
    pub fn iter(&self) -> impl Iterator<Item = InfoRef<'_>> {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur.is_null() {
                return None;
            }
            let this = cur;
            // SAFETY: cur is a node of the list this value owns.
            cur = unsafe { (*cur).next };
            Some(InfoRef {
                raw: this,
                _list: std::marker::PhantomData,
            })
        })
    }
}

impl Drop for InfoList {
    fn drop(&mut self) {
        // SAFETY: head came from fi_getinfo and is freed once.
        unsafe { sys::fi_freeinfo(self.head) };
    }
}

fn libc_strdup(s: &CStr) -> *mut std::os::raw::c_char {
    extern "C" {
        fn strdup(s: *const std::os::raw::c_char) -> *mut std::os::raw::c_char;
    }
    // SAFETY: s is NUL-terminated; strdup returns malloc'ed memory (freed by fi_freeinfo).
    unsafe { strdup(s.as_ptr()) }
}

fn cstr_or_empty(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libfabric strings are NUL-terminated and live as long as their fi_info.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// One entry of an [`InfoList`].
#[derive(Clone, Copy)]
pub struct InfoRef<'a> {
    raw: *mut sys::fi_info,
    _list: std::marker::PhantomData<&'a InfoList>,
}

impl InfoRef<'_> {
    /// The provider name (`"shm"`, `"tcp;ofi_rxm"`, ...).
    pub fn provider(&self) -> String {
        // SAFETY: fabric_attr is set on every entry fi_getinfo returns.
        cstr_or_empty(unsafe { (*(*self.raw).fabric_attr).prov_name })
    }

    /// The domain name (the NIC or, for shm, `"shm"`).
    pub fn domain_name(&self) -> String {
        // SAFETY: as above for domain_attr.
        cstr_or_empty(unsafe { (*(*self.raw).domain_attr).name })
    }

    /// Capabilities granted.
    pub fn caps(&self) -> u64 {
        // SAFETY: valid entry.
        unsafe { (*self.raw).caps }
    }

    /// Copies this entry into an owned [`Info`].
    pub fn to_owned(&self) -> Result<Info, FabricError> {
        let provider = self.provider();
        // SAFETY: fi_dupinfo deep-copies one entry (not its `next`).
        let raw = unsafe { sys::fi_dupinfo(self.raw) };
        if raw.is_null() {
            return Err(FabricError::Call {
                provider,
                call: "fi_dupinfo",
                code: 12,
                message: strerror(12),
            });
        }
        // SAFETY: raw is ours; a duplicated entry must not point into the old list.
        unsafe { (*raw).next = ptr::null_mut() };
        Ok(Info { raw, provider })
    }
}

/// One owned fi_info: the provider and attributes an endpoint is opened with.
pub struct Info {
    raw: *mut sys::fi_info,
    provider: String,
}

// SAFETY: plain heap memory owned by this value.
unsafe impl Send for Info {}

impl Info {
    /// The provider name.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The memory-registration modes the provider requires (a subset of
    /// [`SUPPORTED_MR_MODE`]).
    pub fn mr_mode(&self) -> u32 {
        // SAFETY: valid entry.
        unsafe { (*(*self.raw).domain_attr).mr_mode as u32 }
    }

    /// Capabilities granted.
    pub fn caps(&self) -> u64 {
        // SAFETY: valid entry.
        unsafe { (*self.raw).caps }
    }

    /// Bytes `fi_tinject` may carry.
    pub fn inject_size(&self) -> usize {
        // SAFETY: valid entry; tx_attr is set on entries fi_getinfo returns.
        unsafe {
            let tx = (*self.raw).tx_attr;
            if tx.is_null() {
                0
            } else {
                (*tx).inject_size
            }
        }
    }

    /// The largest message the endpoint accepts.
    pub fn max_msg_size(&self) -> usize {
        // SAFETY: valid entry.
        unsafe { (*(*self.raw).ep_attr).max_msg_size }
    }

    /// Bytes of remote CQ data (immediate data) a send may carry: 4 on verbs, 8 on most others.
    pub fn cq_data_size(&self) -> usize {
        // SAFETY: valid entry.
        unsafe { (*(*self.raw).domain_attr).cq_data_size }
    }

    /// Size of a memory key in bytes.
    pub fn mr_key_size(&self) -> usize {
        // SAFETY: valid entry.
        unsafe { (*(*self.raw).domain_attr).mr_key_size }
    }

    fn error(&self, call: &'static str, rc: i32) -> FabricError {
        let code = rc.abs();
        FabricError::Call {
            provider: self.provider.clone(),
            call,
            code,
            message: strerror(code),
        }
    }
}

impl Drop for Info {
    fn drop(&mut self) {
        // SAFETY: raw came from fi_dupinfo and is freed once.
        unsafe { sys::fi_freeinfo(self.raw) };
    }
}

fn close(fid: *mut sys::fid) {
    if !fid.is_null() {
        // SAFETY: fid is an open libfabric object owned by the caller, closed once. A failure to
        // close cannot be acted on during drop.
        let _ = unsafe { sys::fi_close(fid) };
    }
}

/// An open fabric (`fi_fabric`).
pub struct Fabric {
    raw: *mut sys::fid_fabric,
    info: Info,
}

// SAFETY: see the module documentation.
unsafe impl Send for Fabric {}
// SAFETY: a fabric is only used to open domains, which libfabric allows from any thread.
unsafe impl Sync for Fabric {}

impl Fabric {
    /// Opens the fabric of `info`.
    pub fn open(info: Info) -> Result<Arc<Fabric>, FabricError> {
        let mut raw = ptr::null_mut();
        // SAFETY: info is valid; raw receives the fabric.
        let rc = unsafe { sys::fi_fabric((*info.raw).fabric_attr, &mut raw, ptr::null_mut()) };
        if rc != 0 {
            return Err(info.error("fi_fabric", rc));
        }
        Ok(Arc::new(Fabric { raw, info }))
    }

    /// The info the fabric was opened with.
    pub fn info(&self) -> &Info {
        &self.info
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // SAFETY: reading the embedded fid of an open object.
        close(unsafe { &mut (*self.raw).fid });
    }
}

/// An open domain (`fi_domain`): one NIC (or shm, or tcp) of the fabric.
pub struct Domain {
    raw: *mut sys::fid_domain,
    fabric: Arc<Fabric>,
}

// SAFETY: see the module documentation.
unsafe impl Send for Domain {}
// SAFETY: the domain object itself is only read after opening; calls that use it go through the
// poller thread.
unsafe impl Sync for Domain {}

impl Domain {
    /// Opens the domain of the fabric's info.
    pub fn open(fabric: &Arc<Fabric>) -> Result<Arc<Domain>, FabricError> {
        let mut raw = ptr::null_mut();
        // SAFETY: the fabric is open and its info valid.
        let rc = unsafe { sys::fi_domain(fabric.raw, fabric.info.raw, &mut raw, ptr::null_mut()) };
        if rc != 0 {
            return Err(fabric.info.error("fi_domain", rc));
        }
        Ok(Arc::new(Domain {
            raw,
            fabric: Arc::clone(fabric),
        }))
    }

    /// The info the domain was opened with.
    pub fn info(&self) -> &Info {
        &self.fabric.info
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: the domain is open; every child holds an Arc of it, so none is left.
        close(unsafe { &mut (*self.raw).fid });
    }
}

/// A completion queue in the tagged format.
pub struct CompletionQueue {
    raw: *mut sys::fid_cq,
    domain: Arc<Domain>,
}

// SAFETY: see the module documentation.
unsafe impl Send for CompletionQueue {}

/// One completion.
pub type Completion = sys::fi_cq_tagged_entry;

/// A failed operation read from the queue.
#[derive(Debug)]
pub struct CompletionError {
    /// The failed operation's context.
    pub context: *mut c_void,
    /// The (positive) libfabric error.
    pub err: i32,
    /// The operation's tag, for a tagged receive the message's (`fi_cq_err_entry::tag`).
    pub tag: u64,
    /// The provider's own error text.
    pub message: String,
}

impl CompletionQueue {
    /// Opens a queue of `size` entries.
    pub fn open(domain: &Arc<Domain>, size: usize) -> Result<CompletionQueue, FabricError> {
        let mut attr = sys::fi_cq_attr {
            size,
            format: sys::fi_cq_format_FI_CQ_FORMAT_TAGGED,
            wait_obj: sys::fi_wait_obj_FI_WAIT_NONE,
            ..Default::default()
        };
        let mut raw = ptr::null_mut();
        // SAFETY: the domain is open; attr is valid for the call.
        let rc = unsafe { sys::fi_cq_open(domain.raw, &mut attr, &mut raw, ptr::null_mut()) };
        if rc != 0 {
            return Err(domain.info().error("fi_cq_open", rc));
        }
        Ok(CompletionQueue {
            raw,
            domain: Arc::clone(domain),
        })
    }

    /// Reads up to `out.len()` completions (driving the provider's progress). `Ok(0)` when none;
    /// `Err(Some(e))` for a failed operation, `Err(None)` never.
    pub fn read(
        &self,
        out: &mut [Completion],
    ) -> Result<usize, Result<CompletionError, FabricError>> {
        // SAFETY: out has room for out.len() tagged entries.
        let rc = unsafe { sys::fi_cq_read(self.raw, out.as_mut_ptr().cast(), out.len()) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let code = -rc;
        if code == sys::FI_EAGAIN as isize {
            return Ok(0);
        }
        if code == sys::FI_EAVAIL as isize {
            let mut e = sys::fi_cq_err_entry::default();
            // SAFETY: e is a valid error entry buffer.
            let r = unsafe { sys::fi_cq_readerr(self.raw, &mut e, 0) };
            if r < 0 {
                return Err(Err(self.error("fi_cq_readerr", r as i32)));
            }
            let mut buf = [0 as std::os::raw::c_char; 256];
            // SAFETY: buf is writable for its length; the call returns a NUL-terminated string.
            let text = unsafe {
                sys::fi_cq_strerror(
                    self.raw,
                    e.prov_errno,
                    e.err_data,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            return Err(Ok(CompletionError {
                context: e.op_context,
                err: e.err,
                tag: e.tag,
                message: cstr_or_empty(text),
            }));
        }
        Err(Err(self.error("fi_cq_read", code as i32)))
    }

    fn error(&self, call: &'static str, rc: i32) -> FabricError {
        self.domain.info().error(call, rc)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: open queue; endpoints bound to it hold an Arc and are closed first.
        close(unsafe { &mut (*self.raw).fid });
    }
}

/// An address vector of type `FI_AV_TABLE`: peers are addressed by their insertion index.
pub struct AddressVector {
    raw: *mut sys::fid_av,
    domain: Arc<Domain>,
}

// SAFETY: see the module documentation.
unsafe impl Send for AddressVector {}

/// A peer's address in an [`AddressVector`].
pub type FiAddr = sys::fi_addr_t;

impl AddressVector {
    /// Opens a table for `count` peers.
    pub fn open(domain: &Arc<Domain>, count: usize) -> Result<AddressVector, FabricError> {
        let mut attr = sys::fi_av_attr {
            type_: sys::fi_av_type_FI_AV_TABLE,
            count,
            ..Default::default()
        };
        let mut raw = ptr::null_mut();
        // SAFETY: the domain is open; attr valid for the call.
        let rc = unsafe { sys::fi_av_open(domain.raw, &mut attr, &mut raw, ptr::null_mut()) };
        if rc != 0 {
            return Err(domain.info().error("fi_av_open", rc));
        }
        Ok(AddressVector {
            raw,
            domain: Arc::clone(domain),
        })
    }

    /// Inserts one peer's endpoint name (as returned by [`Endpoint::name`]).
    pub fn insert(&self, name: &[u8]) -> Result<FiAddr, FabricError> {
        let mut addr: FiAddr = sys::FI_ADDR_NOTAVAIL;
        // SAFETY: name holds one address in the provider's format (checked by the provider,
        // which reports a failed insert as 0 inserted).
        let n = unsafe {
            sys::fi_av_insert(
                self.raw,
                name.as_ptr().cast(),
                1,
                &mut addr,
                0,
                ptr::null_mut(),
            )
        };
        if n != 1 || addr == sys::FI_ADDR_NOTAVAIL {
            return Err(if n < 0 {
                self.domain.info().error("fi_av_insert", n)
            } else {
                FabricError::BadName {
                    provider: self.domain.info().provider.clone(),
                    detail: format!("fi_av_insert rejected a {}-byte name", name.len()),
                }
            });
        }
        Ok(addr)
    }
}

impl Drop for AddressVector {
    fn drop(&mut self) {
        // SAFETY: open AV; endpoints bound to it hold an Arc and are closed first.
        close(unsafe { &mut (*self.raw).fid });
    }
}

/// A registered memory region (`fi_mr_reg`).
pub struct MemoryRegion {
    raw: *mut sys::fid_mr,
    _domain: Arc<Domain>,
}

// SAFETY: see the module documentation.
unsafe impl Send for MemoryRegion {}

impl MemoryRegion {
    /// The key a peer uses to access the region.
    pub fn key(&self) -> u64 {
        // SAFETY: open region.
        unsafe { sys::fi_mr_key(self.raw) }
    }

    /// The local descriptor to pass with operations on the region.
    pub fn desc(&self) -> *mut c_void {
        // SAFETY: open region.
        unsafe { sys::fi_mr_desc(self.raw) }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: open region, closed once; revokes remote access to it.
        close(unsafe { &mut (*self.raw).fid });
    }
}

/// An enabled RDM endpoint bound to a completion queue and an address vector.
pub struct Endpoint {
    raw: *mut sys::fid_ep,
    // Taken by `Drop::drop` into a [`ClosedEndpoint`], which closes `raw`, then the queue and
    // AV, then (its last reference) the domain.
    cq: ManuallyDrop<CompletionQueue>,
    av: ManuallyDrop<AddressVector>,
    domain: ManuallyDrop<Arc<Domain>>,
    /// Held by `shm` endpoints: see [`ShmLease`].
    lease: Option<ShmLease>,
}

// SAFETY: see the module documentation.
unsafe impl Send for Endpoint {}

impl Endpoint {
    /// Opens an endpoint, binds `cq` (send and receive completions) and `av`, and enables it.
    pub fn open(
        domain: &Arc<Domain>,
        cq: CompletionQueue,
        av: AddressVector,
    ) -> Result<Endpoint, FabricError> {
        let info = domain.info();
        let lease = (info.provider() == "shm").then(ShmLease::acquire);
        let mut raw = ptr::null_mut();
        // SAFETY: the domain is open and info valid.
        let rc = unsafe { sys::fi_endpoint(domain.raw, info.raw, &mut raw, ptr::null_mut()) };
        if rc != 0 {
            return Err(info.error("fi_endpoint", rc));
        }
        let (cq_raw, av_raw) = (cq.raw, av.raw);
        let ep = Endpoint {
            raw,
            cq: ManuallyDrop::new(cq),
            av: ManuallyDrop::new(av),
            domain: ManuallyDrop::new(Arc::clone(domain)),
            lease,
        };
        let flags = u64::from(sys::FI_TRANSMIT) | u64::from(sys::FI_RECV);
        // SAFETY: ep, cq and av are open; binding takes no ownership.
        let rc = unsafe { sys::fi_ep_bind(ep.raw, &raw mut (*cq_raw).fid, flags) };
        if rc != 0 {
            return Err(info.error("fi_ep_bind(cq)", rc));
        }
        // SAFETY: as above.
        let rc = unsafe { sys::fi_ep_bind(ep.raw, &raw mut (*av_raw).fid, 0) };
        if rc != 0 {
            return Err(info.error("fi_ep_bind(av)", rc));
        }
        // SAFETY: a bound endpoint.
        let rc = unsafe { sys::fi_enable(ep.raw) };
        if rc != 0 {
            return Err(info.error("fi_enable", rc));
        }
        Ok(ep)
    }

    /// The provider in use.
    pub fn provider(&self) -> &str {
        self.domain.info().provider()
    }

    /// The domain's info.
    pub fn info(&self) -> &Info {
        self.domain.info()
    }

    /// This endpoint's name (`fi_getname`), to be inserted into peers' address vectors.
    pub fn name(&self) -> Result<Vec<u8>, FabricError> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: buf is writable for len bytes.
        let mut rc =
            unsafe { sys::fi_getname(&mut (*self.raw).fid, buf.as_mut_ptr().cast(), &mut len) };
        if rc == -(sys::FI_ETOOSMALL as i32) {
            buf.resize(len, 0);
            // SAFETY: as above with the size the provider asked for.
            rc =
                unsafe { sys::fi_getname(&mut (*self.raw).fid, buf.as_mut_ptr().cast(), &mut len) };
        }
        if rc != 0 {
            return Err(self.info().error("fi_getname", rc));
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// The address vector.
    pub fn av(&self) -> &AddressVector {
        &self.av
    }

    /// The completion queue.
    pub fn cq(&self) -> &CompletionQueue {
        &self.cq
    }

    /// Registers `len` bytes at `buf` for `access` (`FI_SEND | FI_RECV | FI_READ |
    /// FI_REMOTE_READ` ...) with `requested_key` (ignored under `FI_MR_PROV_KEY`), binding and
    /// enabling it under `FI_MR_ENDPOINT`.
    ///
    /// # Safety
    /// The memory must stay valid until the region is dropped, and the region must be dropped
    /// before the memory is freed or reused for anything a peer must not see.
    pub unsafe fn register(
        &self,
        buf: *const u8,
        len: usize,
        access: u64,
        requested_key: u64,
    ) -> Result<MemoryRegion, FabricError> {
        let info = self.info();
        let mut raw = ptr::null_mut();
        // SAFETY: the caller keeps buf valid; the domain is open.
        let rc = unsafe {
            sys::fi_mr_reg(
                self.domain.raw,
                buf.cast(),
                len,
                access,
                0,
                requested_key,
                0,
                &mut raw,
                ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(info.error("fi_mr_reg", rc));
        }
        let mr = MemoryRegion {
            raw,
            _domain: Arc::clone(&self.domain),
        };
        if info.mr_mode() & sys::FI_MR_ENDPOINT != 0 {
            // SAFETY: open region and endpoint.
            let rc = unsafe { sys::fi_mr_bind(mr.raw, &mut (*self.raw).fid, 0) };
            if rc != 0 {
                return Err(info.error("fi_mr_bind", rc));
            }
            // SAFETY: a bound region.
            let rc = unsafe { sys::fi_mr_enable(mr.raw) };
            if rc != 0 {
                return Err(info.error("fi_mr_enable", rc));
            }
        }
        Ok(mr)
    }

    /// Posts a tagged receive matching every tag from every peer into `buf`.
    ///
    /// # Safety
    /// `buf` (and `desc`'s region) must stay valid and untouched until the completion for
    /// `context` is read; `context` must point to a live `fi_context2`.
    pub unsafe fn post_recv_any(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        context: *mut c_void,
    ) -> Result<bool, FabricError> {
        // SAFETY: per the caller's contract.
        let rc = unsafe {
            sys::fi_trecv(
                self.raw,
                buf.cast(),
                len,
                desc,
                sys::FI_ADDR_UNSPEC,
                0,
                u64::MAX,
                context,
            )
        };
        self.posted("fi_trecv", rc)
    }

    /// Posts a tagged send of `len` bytes at `buf` to `dest`.
    ///
    /// # Safety
    /// As for [`Endpoint::post_recv_any`].
    pub unsafe fn post_send(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: FiAddr,
        tag: u64,
        context: *mut c_void,
    ) -> Result<bool, FabricError> {
        // SAFETY: per the caller's contract.
        let rc = unsafe { sys::fi_tsend(self.raw, buf.cast(), len, desc, dest, tag, context) };
        self.posted("fi_tsend", rc)
    }

    /// Sends `data` (at most the inject size) without a completion; the buffer is free on return.
    pub fn inject(&self, data: &[u8], dest: FiAddr, tag: u64) -> Result<bool, FabricError> {
        // SAFETY: data is valid for the call, which copies it.
        let rc = unsafe { sys::fi_tinject(self.raw, data.as_ptr().cast(), data.len(), dest, tag) };
        self.posted("fi_tinject", rc)
    }

    /// Posts an RMA read of `len` bytes from the peer's `(addr, key)` into `buf`.
    ///
    /// # Safety
    /// As for [`Endpoint::post_recv_any`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_read(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        src: FiAddr,
        addr: u64,
        key: u64,
        context: *mut c_void,
    ) -> Result<bool, FabricError> {
        // SAFETY: per the caller's contract.
        let rc = unsafe { sys::fi_read(self.raw, buf.cast(), len, desc, src, addr, key, context) };
        self.posted("fi_read", rc)
    }

    /// `Ok(true)` posted, `Ok(false)` the provider said `FI_EAGAIN` (retry after progress).
    fn posted(&self, call: &'static str, rc: isize) -> Result<bool, FabricError> {
        if rc == -(sys::FI_EAGAIN as isize) {
            return Ok(false);
        }
        check(self.provider(), call, rc).map(|()| true)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: each field is taken exactly once, here, and never used again.
        let closed = unsafe {
            ClosedEndpoint {
                raw: self.raw,
                _cq: ManuallyDrop::take(&mut self.cq),
                _av: ManuallyDrop::take(&mut self.av),
                _domain: ManuallyDrop::take(&mut self.domain),
            }
        };
        match self.lease.take() {
            Some(lease) => lease.retire(closed),
            None => drop(closed),
        }
    }
}

/// The parts of a dropped endpoint, closed when this value drops: the endpoint (which cancels
/// its posted operations; their buffers belong to the caller, who frees them only after this),
/// then its queue and address vector, then the domain.
struct ClosedEndpoint {
    raw: *mut sys::fid_ep,
    _cq: CompletionQueue,
    _av: AddressVector,
    _domain: Arc<Domain>,
}

// SAFETY: libfabric objects are not tied to a thread; a parked endpoint is only closed, once.
unsafe impl Send for ClosedEndpoint {}

impl Drop for ClosedEndpoint {
    fn drop(&mut self) {
        // SAFETY: the endpoint is open and closed only here.
        close(unsafe { &mut (*self.raw).fid });
    }
}

/// Works around a libfabric `shm` hazard (seen with 1.17): when two `shm` endpoints live in one
/// process, each maps the other's shared region by reusing the peer endpoint's own mapping
/// instead of mapping it again. Closing one endpoint unmaps its region while the other's
/// progress may still lock it, and `fi_cq_read` crashes (SIGSEGV in `pthread_spin_trylock`).
/// So an `shm` endpoint dropped while another `shm` endpoint of this process is open is parked,
/// not closed; the parked ones are closed together when the last one is dropped. One rank per
/// process (`fmi run`) never parks anything; several ranks in one process (tests, threads) keep
/// their closed endpoints until the last of them goes.
struct ShmLease(());

struct Linger {
    open: usize,
    parked: Vec<ClosedEndpoint>,
}

static SHM_LINGER: Mutex<Linger> = Mutex::new(Linger {
    open: 0,
    parked: Vec::new(),
});

impl ShmLease {
    fn acquire() -> ShmLease {
        SHM_LINGER.lock().unwrap_or_else(|e| e.into_inner()).open += 1;
        ShmLease(())
    }

    /// Parks `closed` until the last lease is gone (which may be this one).
    fn retire(self, closed: ClosedEndpoint) {
        SHM_LINGER
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .parked
            .push(closed);
        drop(self);
    }
}

impl Drop for ShmLease {
    fn drop(&mut self) {
        let to_close = {
            let mut l = SHM_LINGER.lock().unwrap_or_else(|e| e.into_inner());
            l.open = l.open.saturating_sub(1);
            if l.open == 0 {
                std::mem::take(&mut l.parked)
            } else {
                Vec::new()
            }
        };
        // Closed outside the lock: closing may progress the provider.
        drop(to_close);
    }
}

/// The number of `shm` endpoints parked by [`ShmLease`] (for tests).
#[doc(hidden)]
pub fn shm_parked() -> usize {
    SHM_LINGER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .parked
        .len()
}
