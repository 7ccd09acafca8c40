-- Claim up to n groups within max_staleness of the learner's version, oldest first.
-- ARGV: n, min_n, max_staleness, visibility_ms, token.
-- Returns {version, id1, payload1, min_version1, reuse1, id2, ...}; no claims when fewer
-- than min_n groups are admissible, so a waiting learner holds nothing.
local n, min_n, max_staleness = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local visibility_ms, token = tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
local version = current_version()
requeue_expired_claims(now)

-- Groups older than the bound can never become fresher: drop them, counted.
local oldest_allowed = version - max_staleness
local stale = redis.call('ZRANGEBYSCORE', K_READY, '-inf', '(' .. oldest_allowed)
for _, id in ipairs(stale) do
  remove_entry(id)
end
if #stale > 0 then
  redis.call('HINCRBY', K_COUNTERS, 'dropped_stale', #stale)
  release_admission(#stale)
end

local chosen = redis.call('ZRANGEBYSCORE', K_READY, oldest_allowed, '+inf', 'WITHSCORES', 'LIMIT', 0, n)
local result = {version}
if #chosen / 2 < min_n then return result end
for i = 1, #chosen, 2 do
  local id, min_version = chosen[i], tonumber(chosen[i + 1])
  redis.call('ZREM', K_READY, id)
  redis.call('ZADD', K_CLAIMED, now + visibility_ms, id)
  redis.call('HSET', K_CLAIM_TOKEN, id, token)
  redis.call('HINCRBY', K_SAMPLED, version - min_version, 1)
  table.insert(result, id)
  table.insert(result, redis.call('HGET', K_PAYLOAD, id))
  table.insert(result, min_version)
  table.insert(result, tonumber(redis.call('HGET', K_REUSE, id) or '0'))
end
redis.call('HINCRBY', K_COUNTERS, 'sampled', #chosen / 2)
return result
