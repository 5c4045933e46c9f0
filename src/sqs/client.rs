//! Building the SQS client: from the environment (bounded timeouts), or for LocalStack.

use aws_sdk_sqs::Client;

/// A client configured from the environment: the SDK's credential chain, region and
/// `AWS_ENDPOINT_URL` (set it to LocalStack's URL to work locally).
pub async fn client_from_env() -> Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(timeouts())
        .load()
        .await;
    Client::new(&config)
}

/// Bounds on every SQS call, so an endpoint that accepts a connection and then says nothing
/// (a black-holed network) fails a call instead of hanging a poller for good. An attempt may
/// take a whole long poll (at most 20 s) plus the reply.
pub(super) fn timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .operation_attempt_timeout(std::time::Duration::from_secs(30))
        .build()
}

/// A client for a local endpoint such as LocalStack: the given URL, region us-east-1 unless
/// AWS_REGION says otherwise, and static test credentials unless the environment has some.
pub async fn local_client(endpoint_url: &str) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint_url)
        .timeout_config(timeouts());
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        loader = loader.region(aws_config::Region::new("us-east-1"));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "local",
        ));
    }
    Client::new(&loader.load().await)
}
