# Tenants' doors, where no caller is verified (services/preprocess/service.py): a tenant's Pub/Sub job
# door, job-requests.<tenant> (shared/domain/events.py door_topic), on which only the tenant's
# principals may publish, so the topic a JobRequested arrives on is whose it is. (Its bucket door,
# incoming/<tenant>/, is the prefix-conditioned objectCreator grant in iam.tf.) The preprocess
# service takes every door listed in FTPIPE_JOB_DOORS (main.tf common_env).
locals {
  doors = { for tenant, t in var.tenants : tenant => t if length(t.job_publishers) > 0 }
  door_publishers = {
    for pair in flatten([for tenant, t in local.doors : [for who in t.job_publishers : {
    key = "${tenant}/${who}", tenant = tenant, member = who }]]) : pair.key => pair
  }
}

resource "google_pubsub_topic" "doors" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption keys; a project that requires CMEK adds kms_key_name here and grants the service agent the key
  for_each                   = local.doors
  name                       = "job-requests.${each.key}"
  message_retention_duration = "86400s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_topic" "door_dead_letters" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption keys; a project that requires CMEK adds kms_key_name here and grants the service agent the key
  for_each                   = local.doors
  name                       = "job-requests.${each.key}-dead-letter"
  message_retention_duration = "604800s"
  depends_on                 = [google_project_service.apis]
}

resource "google_pubsub_subscription" "door_dlq" {
  for_each                   = local.doors
  name                       = "dlq.job-requests.${each.key}-dead-letter"
  topic                      = google_pubsub_topic.door_dead_letters[each.key].id
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

resource "google_pubsub_subscription" "doors" {
  for_each                   = local.doors
  name                       = "preprocess.job-requests.${each.key}"
  topic                      = google_pubsub_topic.doors[each.key].id
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
    dead_letter_topic     = google_pubsub_topic.door_dead_letters[each.key].id
    max_delivery_attempts = var.max_delivery_attempts
  }
  expiration_policy {
    ttl = ""
  }
}

# Only the tenant's principals publish on its door: nobody else's request can arrive there.
resource "google_pubsub_topic_iam_member" "door_publishers" {
  for_each = local.door_publishers
  topic    = google_pubsub_topic.doors[each.value.tenant].id
  role     = "roles/pubsub.publisher"
  member   = each.value.member
}

resource "google_pubsub_subscription_iam_member" "preprocess_takes_doors" {
  for_each     = local.doors
  subscription = google_pubsub_subscription.doors[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.sa_member["preprocess"]
}

resource "google_pubsub_subscription_iam_member" "preprocess_reads_doors" {
  for_each     = local.doors
  subscription = google_pubsub_subscription.doors[each.key].id
  role         = "roles/pubsub.viewer"
  member       = local.sa_member["preprocess"]
}

# The runtime dead-letters with a reason itself (preprocess), and Pub/Sub's agent does past the policy.
resource "google_pubsub_topic_iam_member" "preprocess_dead_letters_doors" {
  for_each = local.doors
  topic    = google_pubsub_topic.door_dead_letters[each.key].id
  role     = "roles/pubsub.publisher"
  member   = local.sa_member["preprocess"]
}

resource "google_pubsub_topic_iam_member" "agent_dead_letters_doors" {
  for_each = local.doors
  topic    = google_pubsub_topic.door_dead_letters[each.key].id
  role     = "roles/pubsub.publisher"
  member   = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_subscribes_doors" {
  for_each     = local.doors
  subscription = google_pubsub_subscription.doors[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}
