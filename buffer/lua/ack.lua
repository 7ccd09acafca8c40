-- Finish claims after a learner step. ARGV: token, max_reuse, id1, id2, ...
-- A claim that expired (and may have been handed to another consumer) is not acked by
-- its late first owner: only the token holding the claim can ack it.
-- Returns {stale_claims, reused, acked_id1, acked_id2, ...}.
local token, max_reuse = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local result = {0, 0}
local stale, reused = 0, 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', K_CLAIM_TOKEN, id) ~= token then
    stale = stale + 1
  else
    redis.call('ZREM', K_CLAIMED, id)
    redis.call('HDEL', K_CLAIM_TOKEN, id)
    local uses = tonumber(redis.call('HGET', K_REUSE, id) or '0')
    if uses < max_reuse then
      -- Deliberate off-policy replay: back to ready, its use counted.
      redis.call('HSET', K_REUSE, id, uses + 1)
      redis.call('ZADD', K_READY, redis.call('ZSCORE', K_LIVE, id), id)
      reused = reused + 1
    else
      remove_entry(id)
      redis.call('ZADD', K_ACKED, now, id)
    end
    table.insert(result, id)
  end
end
redis.call('HINCRBY', K_COUNTERS, 'acked', #result - 2)
if reused > 0 then redis.call('HINCRBY', K_COUNTERS, 'reused', reused) end
if stale > 0 then redis.call('HINCRBY', K_COUNTERS, 'stale_acks', stale) end
result[1], result[2] = stale, reused
return result
