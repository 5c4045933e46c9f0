"""Create the demo SQS queues for sqs-worker (idempotent).

Runs in two ways:
  * by LocalStack itself as a READY init hook (Docker: ./init/ready.d is
    mounted at /etc/localstack/init/ready.d), and
  * from the host by localstack/up, with the venv's python (boto3 comes with
    localstack-core[base-runtime]).

LocalStack runs .py hooks with exec(source, {}) inside its own process, so
there is deliberately no `if __name__ == "__main__"` guard (it would be
false there) and no sys.exit (it would raise inside LocalStack).
"""

import json
import os

import boto3

ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
sqs = boto3.client(
    "sqs",
    endpoint_url=ENDPOINT,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)

# CreateQueue without attributes is idempotent even if the queue exists with
# other settings; the settings are then applied with SetQueueAttributes, so a
# re-run also repairs a queue whose attributes were changed by hand.
dlq_url = sqs.create_queue(QueueName="orders-dlq")["QueueUrl"]
dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
    "Attributes"
]["QueueArn"]

orders_url = sqs.create_queue(QueueName="orders")["QueueUrl"]
sqs.set_queue_attributes(
    QueueUrl=orders_url,
    Attributes={
        "VisibilityTimeout": "30",
        "RedrivePolicy": json.dumps(
            {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}
        ),
    },
)

print(f"orders-dlq  {dlq_url}")
print(f"orders      {orders_url}")
