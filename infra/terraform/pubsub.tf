# The topology of shared/platform/topology.py, written out: tests/infra/test_terraform.py derives the same
# lists from the code and fails on any difference, either way.
locals {
  # topic => its dead-letter topic (shared/domain/events.py dead_letter_topic) and the subscription on it
  # that `ftpipe dlq` reads (shared/platform/topology.py dlq_subscription).
  topics = {
    "dataset-uploads" = { dead_letter = "dataset-uploads-dead-letter", dlq_subscription = "dlq.dataset-uploads-dead-letter" }
    "jobs"            = { dead_letter = "jobs-dead-letter", dlq_subscription = "dlq.jobs-dead-letter" }
    "datasets"        = { dead_letter = "datasets-dead-letter", dlq_subscription = "dlq.datasets-dead-letter" }
    "training"        = { dead_letter = "training-dead-letter", dlq_subscription = "dlq.training-dead-letter" }
    "evaluations"     = { dead_letter = "evaluations-dead-letter", dlq_subscription = "dlq.evaluations-dead-letter" }
    "models"          = { dead_letter = "models-dead-letter", dlq_subscription = "dlq.models-dead-letter" }
    "notices"         = { dead_letter = "notices-dead-letter", dlq_subscription = "dlq.notices-dead-letter" }
  }

  # The pull subscriptions of the services that pull (shared/platform/topology.py SERVICE_TOPICS and
  # subscriptions()): the trainer has one per priority class on each of its topics, filtered on the
  # `priority` attribute (shared/platform/scheduling.py); the batch one keeps the plain name and also takes
  # messages without the attribute.
  pull_subscriptions = {
    "preprocess.dataset-uploads"   = { service = "preprocess", topic = "dataset-uploads", filter = "" }
    "preprocess.jobs"              = { service = "preprocess", topic = "jobs", filter = "" }
    "trainer.datasets.production"  = { service = "trainer", topic = "datasets", filter = "attributes.priority = \"production\"" }
    "trainer.datasets.interactive" = { service = "trainer", topic = "datasets", filter = "attributes.priority = \"interactive\"" }
    "trainer.datasets"             = { service = "trainer", topic = "datasets", filter = "attributes.priority = \"batch\" OR NOT attributes:priority" }
    "trainer.jobs.production"      = { service = "trainer", topic = "jobs", filter = "attributes.priority = \"production\"" }
    "trainer.jobs.interactive"     = { service = "trainer", topic = "jobs", filter = "attributes.priority = \"interactive\"" }
    "trainer.jobs"                 = { service = "trainer", topic = "jobs", filter = "attributes.priority = \"batch\" OR NOT attributes:priority" }
    "tracker.jobs"                 = { service = "tracker", topic = "jobs", filter = "" }
    "tracker.datasets"             = { service = "tracker", topic = "datasets", filter = "" }
    "tracker.training"             = { service = "tracker", topic = "training", filter = "" }
    "tracker.evaluations"          = { service = "tracker", topic = "evaluations", filter = "" }
    "tracker.models"               = { service = "tracker", topic = "models", filter = "" }
    "tracker.notices"              = { service = "tracker", topic = "notices", filter = "" }
    "serving.models"               = { service = "serving", topic = "models", filter = "" }
  }

  # The same, with the tenants' job doors (doors.tf): each door is a topic like the others, with its
  # dead-letter topic, the `ftpipe dlq` subscription on that, and the preprocess service's pull subscription.
  all_topics = merge(local.topics, { for tenant in keys(local.doors) : "job-requests.${tenant}" => {
  dead_letter = "job-requests.${tenant}-dead-letter", dlq_subscription = "dlq.job-requests.${tenant}-dead-letter" } })
  all_pull_subscriptions = merge(local.pull_subscriptions, { for tenant in keys(local.doors) :
  "preprocess.job-requests.${tenant}" => { service = "preprocess", topic = "job-requests.${tenant}", filter = "" } })

  # The evaluator takes `training` by push on Cloud Run (services/evaluator/app.py); the registry
  # takes `evaluations` through its function's Eventarc trigger (functions.tf), whose subscription
  # Eventarc creates and names itself.
  push_subscriptions = {
    "evaluator.training" = { service = "evaluator", topic = "training" }
  }
  event_triggers = {
    "registry.evaluations" = { service = "registry", topic = "evaluations" }
  }

  # Settings.subscription_policy() defaults (shared/platform/config.py, shared/platform/ports.py SubscriptionPolicy),
  # as the Pub/Sub adapter writes them (shared/platform/adapters/pubsub.py _subscription_resource).
  subscription_policy = {
    ack_deadline_seconds       = 60
    message_retention_duration = "604800s"
    minimum_backoff            = "1s"
    maximum_backoff            = "60s"
  }
  # What ensure_topology gives the dlq.* subscriptions: a long life, no dead-letter topic of their own.
  dlq_policy = {
    ack_deadline_seconds       = 60
    message_retention_duration = "604800s"
    minimum_backoff            = "1s"
    maximum_backoff            = "60s"
  }
  # The push subscription waits up to Pub/Sub's maximum for an evaluation's answer, and retries
  # with the longest backoff (see var.evaluator_max_delivery_attempts).
  push_policy = {
    ack_deadline_seconds       = 600
    message_retention_duration = "604800s"
    minimum_backoff            = "60s"
    maximum_backoff            = "600s"
  }
  # The label the Pub/Sub adapter reads to dead-letter itself with a reason (shared/platform/adapters/pubsub.py).
  max_attempts_label = "ftpipe-max-delivery-attempts"
  pubsub_agent       = "serviceAccount:${google_project_service_identity.agents["pubsub.googleapis.com"].email}"
}

resource "google_pubsub_topic" "topics" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption keys; a project that requires CMEK adds kms_key_name here and grants the service agent the key
  for_each                   = local.all_topics
  name                       = each.key
  message_retention_duration = "86400s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption keys; a project that requires CMEK adds kms_key_name here and grants the service agent the key
  for_each                   = local.all_topics
  name                       = each.value.dead_letter
  message_retention_duration = "604800s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_subscription" "dlq" {
  for_each                   = local.all_topics
  name                       = each.value.dlq_subscription
  topic                      = google_pubsub_topic.dead_letter[each.key].id
  ack_deadline_seconds       = local.dlq_policy.ack_deadline_seconds
  message_retention_duration = local.dlq_policy.message_retention_duration
  retain_acked_messages      = false
  retry_policy {
    minimum_backoff = local.dlq_policy.minimum_backoff
    maximum_backoff = local.dlq_policy.maximum_backoff
  }
  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_subscription" "pull" {
  for_each                   = local.all_pull_subscriptions
  name                       = each.key
  topic                      = google_pubsub_topic.topics[each.value.topic].id
  filter                     = each.value.filter
  ack_deadline_seconds       = local.subscription_policy.ack_deadline_seconds
  message_retention_duration = local.subscription_policy.message_retention_duration
  labels = {
    (local.max_attempts_label) = tostring(var.max_delivery_attempts)
  }
  retry_policy {
    minimum_backoff = local.subscription_policy.minimum_backoff
    maximum_backoff = local.subscription_policy.maximum_backoff
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.value.topic].id
    max_delivery_attempts = var.max_delivery_attempts
  }
  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_subscription" "push" {
  for_each                   = local.push_subscriptions
  name                       = each.key
  topic                      = google_pubsub_topic.topics[each.value.topic].id
  ack_deadline_seconds       = local.push_policy.ack_deadline_seconds
  message_retention_duration = local.push_policy.message_retention_duration
  labels = {
    (local.max_attempts_label) = tostring(var.evaluator_max_delivery_attempts)
  }
  retry_policy {
    minimum_backoff = local.push_policy.minimum_backoff
    maximum_backoff = local.push_policy.maximum_backoff
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.value.topic].id
    max_delivery_attempts = var.evaluator_max_delivery_attempts
  }
  push_config {
    push_endpoint = "${google_cloud_run_v2_service.evaluator.uri}/pubsub/push"
    # Pub/Sub signs each push with this account's ID token for this audience; the app checks both
    # (shared/platform/push.py OidcVerifier: FTPIPE_PUSH_AUDIENCE, FTPIPE_PUSH_SERVICE_ACCOUNT).
    oidc_token {
      service_account_email = google_service_account.sa["push"].email
      audience              = local.evaluator_push_audience
    }
  }
  expiration_policy {
    ttl = ""
  }
  depends_on = [google_service_account_iam_member.pubsub_signs_push]
}

# Dead-lettering is done by Pub/Sub's service agent: it publishes to the dead-letter topics and
# acknowledges on the source subscriptions.
resource "google_pubsub_topic_iam_member" "agent_publishes_dead_letters" {
  for_each = local.all_topics
  topic    = google_pubsub_topic.dead_letter[each.key].id
  role     = "roles/pubsub.publisher"
  member   = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_subscribes_pull" {
  for_each     = local.all_pull_subscriptions
  subscription = google_pubsub_subscription.pull[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_subscribes_push" {
  for_each     = local.push_subscriptions
  subscription = google_pubsub_subscription.push[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# The agent mints the push subscription's OIDC tokens as the push account.
resource "google_service_account_iam_member" "pubsub_signs_push" {
  service_account_id = google_service_account.sa["push"].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}
