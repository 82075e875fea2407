# Tenants' doors, where no caller is verified (services/preprocess/service.py): a tenant's Pub/Sub job
# door, job-requests.<tenant> (shared/domain/events.py door_topic), on which only the tenant's
# principals may publish, so the topic a JobRequested arrives on is whose it is. Each door is a topic
# like the others (pubsub.tf local.all_topics, local.all_pull_subscriptions: its dead letters and the
# preprocess service's subscription). Its bucket door, incoming/<tenant>/, is the prefix-conditioned
# objectCreator grant in iam.tf. The preprocess service takes every door in FTPIPE_JOB_DOORS (main.tf).
locals {
  doors = { for tenant, t in var.tenants : tenant => t if length(t.job_publishers) > 0 }
  door_publishers = {
    for pair in flatten([for tenant, t in local.doors : [for who in t.job_publishers : {
    key = "${tenant}/${who}", tenant = tenant, member = who }]]) : pair.key => pair
  }
}

# Only the tenant's principals publish on its door: nobody else's request can arrive there.
resource "google_pubsub_topic_iam_member" "door_publishers" {
  for_each = local.door_publishers
  topic    = google_pubsub_topic.topics["job-requests.${each.value.tenant}"].id
  role     = "roles/pubsub.publisher"
  member   = each.value.member
}
