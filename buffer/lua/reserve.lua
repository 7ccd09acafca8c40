-- Admission control (AReaL's rule): grant leases to start new groups while
--   admitted <= (version + max_staleness + 1) * groups_per_version
-- where `admitted` counts every group ever admitted that may still be trained. Capacity
-- is freed by version bumps, not by acks: a learner consuming groups_per_version groups
-- per version, oldest first, then trains every admitted group at most max_staleness
-- versions after the version it was admitted at. A second cap keeps what waits (ready
-- groups and open leases) within (max_staleness + 1) * groups_per_version (it matters
-- after a resume). Claimed groups do not count: they are being trained on, and a learner
-- that holds its batches until a checkpoint would otherwise stop admission altogether.
-- ARGV: n, lease_prefix, lease_ms, groups_per_version, max_staleness.
-- Returns {version, lease1, lease2, ...}.
local n, lease_prefix, lease_ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local groups_per_version, max_staleness = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
purge_expired_leases(now)
local version = current_version()
local admitted = tonumber(redis.call('HGET', K_COUNTERS, 'admitted') or '0')
local by_version = (version + max_staleness + 1) * groups_per_version - admitted
local in_system = (max_staleness + 1) * groups_per_version
  - redis.call('ZCARD', K_READY) - redis.call('ZCARD', K_LEASES)
local grant = math.max(0, math.min(n, by_version, in_system))
local result = {version}
for _ = 1, grant do
  local lease = lease_prefix .. redis.call('HINCRBY', K_COUNTERS, 'leases_granted', 1)
  redis.call('ZADD', K_LEASES, now + lease_ms, lease)
  table.insert(result, lease)
end
redis.call('HINCRBY', K_COUNTERS, 'admitted', grant)
return result
