//! Fail points for the chaos and race tests: async pauses compiled in only with the
//! `failpoints` feature.

/// With the `failpoints` feature, a test can make the task reaching this point wait
/// (`fail::cfg(name, "return(MILLIS)")`). The wait is asynchronous: fail's own `sleep` action
/// would block the runtime thread, which is not what a slow call looks like.
#[cfg(feature = "failpoints")]
pub(super) async fn pause_at(name: &'static str) {
    let millis = (|| {
        fail::fail_point!(name, |arg| arg.and_then(|a| a.parse::<u64>().ok()));
        None
    })();
    if let Some(millis) = millis {
        tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
    }
}

#[cfg(not(feature = "failpoints"))]
pub(super) async fn pause_at(_name: &'static str) {}
