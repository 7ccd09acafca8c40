-- Finish claims after a learner step. ARGV: token, max_reuse, id1, id2, ...
-- A claim that expired (and may have been handed to another consumer) is not acked by
-- its late first owner: only the token holding the claim can ack it.
-- Returns {stale_claims, reused, acked_id1, acked_id2, ...}.
local token, max_reuse = ARGV[1], tonumber(ARGV[2])
local result = {0, 0}
if #ARGV < 3 then return result end
local ids = {unpack(ARGV, 3)}
local holders = redis.call('HMGET', K_CLAIM_TOKEN, unpack(ids))
local mine = {}
for i, id in ipairs(ids) do
  if holders[i] == token then table.insert(mine, id) end
end
local stale = #ids - #mine
if #mine > 0 then
  call_chunked('ZREM', K_CLAIMED, mine)
  call_chunked('HDEL', K_CLAIM_TOKEN, mine)
  local uses = redis.call('HMGET', K_REUSE, unpack(mine))
  local finished, tombstones, replay, replay_uses = {}, {}, {}, {}
  local now = now_ms()
  for i, id in ipairs(mine) do
    local used = tonumber(uses[i] or '0')
    if used < max_reuse then
      table.insert(replay, id)
      table.insert(replay_uses, used + 1)
    else
      table.insert(finished, id)
      table.insert(tombstones, now)
      table.insert(tombstones, id)
    end
    table.insert(result, id)
  end
  if #replay > 0 then
    -- Deliberate off-policy replay: back to ready under its version, its use counted.
    local versions = redis.call('ZMSCORE', K_LIVE, unpack(replay))
    for i, id in ipairs(replay) do
      redis.call('HSET', K_REUSE, id, replay_uses[i])
      redis.call('ZADD', K_READY, versions[i], id)
    end
    redis.call('HINCRBY', K_COUNTERS, 'reused', #replay)
  end
  remove_entries(finished)
  if #tombstones > 0 then call_chunked('ZADD', K_ACKED, tombstones) end
  redis.call('HINCRBY', K_COUNTERS, 'acked', #mine)
  result[2] = #replay
end
if stale > 0 then redis.call('HINCRBY', K_COUNTERS, 'stale_acks', stale) end
result[1] = stale
return result
