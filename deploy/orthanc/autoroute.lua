-- Orthanc auto-routing for ms-forecast-node (research use only).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), send its MR series to
-- the forecast node. The node sends SEG, SR, key images and a PDF back into the same study,
-- which makes the study unstable and then stable again: the checks below make sure those
-- results (and series already sent) are never routed a second time, so there is no loop.
--
-- Needs, in Orthanc's configuration (see orthanc.json next to this file):
--   "DicomModalities": { "<FORECAST_MODALITY>": { "AET": ..., "Host": ..., "Port": ... } }
--   "UserMetadata":    { "<ROUTED_METADATA>": <an unused index from 1024 to 65535> }
-- Without the UserMetadata entry routing still works, but a series may be sent again when the
-- study becomes stable again; the node ignores instances it already holds, so that is only
-- wasted traffic.
--
-- A failed send (node down) is logged ("msfn-autoroute: ...") and not retried by itself: the
-- series stay unmarked, so they go with the study's next stable event, or resend them with
--   curl -u admin:... -X POST http://pacs:8042/modalities/msforecast/store -d '["<study id>"]'
-- The node itself never loses what it acknowledged, and retries its own sends.

-- ---- site settings ------------------------------------------------------------------------
-- Name of the node in "DicomModalities" (not its AE title).
local FORECAST_MODALITY = 'msforecast'
-- AE title the node uses when it sends results (listen.ae_title in the node's YAML).
local NODE_AET = 'MSFORECAST'
-- Manufacturer (0008,0070) of every object the node makes (dicom_templates/outputs.yaml).
local NODE_MANUFACTURER = 'ms-forecast-node'
-- Every series description of the node's outputs ends with its disclaimer.
local NODE_DESCRIPTION_MARK = 'NOT FOR DIAGNOSTIC USE'
-- Series-level metadata that remembers how many instances of a series were routed.
local ROUTED_METADATA = 'MsfnRouted'
-- Modalities the node forecasts from (series Modality (0008,0060)).
local ROUTED_MODALITIES = { MR = true }
-- --------------------------------------------------------------------------------------------

local function log(message)
  print('msfn-autoroute: ' .. message)
end

-- RestApiGet raises or returns nil on a missing resource depending on the Orthanc version;
-- both mean "not there" here.
local function tryGet(uri)
  local ok, result = pcall(RestApiGet, uri)
  if ok and result ~= nil and result ~= '' then
    return result
  end
  return nil
end

-- All metadata of a resource as a table. "?expand" lists the values, so asking for a name that
-- is not set yet does not log an error in Orthanc's log.
local function metadataOf(level, id)
  local text = tryGet('/' .. level .. '/' .. id .. '/metadata?expand')
  if text == nil then
    return {}
  end
  return ParseJson(text)
end

local function isOurs(series)
  local tags = series['MainDicomTags'] or {}
  if tags['Manufacturer'] == NODE_MANUFACTURER then
    return true
  end
  local description = tags['SeriesDescription'] or ''
  if string.find(string.upper(description), NODE_DESCRIPTION_MARK, 1, true) then
    return true
  end
  -- Objects the node stored carry its AE title as the instance's RemoteAET metadata, even if
  -- a site template changed Manufacturer or the descriptions.
  local first = (series['Instances'] or {})[1]
  if first ~= nil then
    if metadataOf('instances', first)['RemoteAET'] == NODE_AET then
      return true
    end
  end
  return false
end

local function alreadyRouted(series)
  local routed = tonumber(metadataOf('series', series['ID'])[ROUTED_METADATA])
  -- A series that gained instances since it was sent is sent again: the node keeps what it
  -- already has and makes a new study version from the complete series.
  return routed ~= nil and routed >= #(series['Instances'] or {})
end

local function markRouted(series)
  local ok = pcall(RestApiPut, '/series/' .. series['ID'] .. '/metadata/' .. ROUTED_METADATA,
                   tostring(#(series['Instances'] or {})))
  if not ok then
    log('cannot set metadata ' .. ROUTED_METADATA .. ' (declare it in "UserMetadata")')
  end
end

function OnStableStudy(studyId, tags, metadata)
  local listing = tryGet('/studies/' .. studyId .. '/series')
  if listing == nil then
    return
  end
  -- Orthanc does not store ModalitiesInStudy; the series' Modality tags say the same.
  local selected = {}
  local ids = {}
  for _, series in ipairs(ParseJson(listing)) do
    local modality = (series['MainDicomTags'] or {})['Modality'] or ''
    if ROUTED_MODALITIES[modality] and not isOurs(series) and not alreadyRouted(series) then
      table.insert(selected, series)
      table.insert(ids, series['ID'])
    end
  end
  if #ids == 0 then
    return
  end
  log('study ' .. studyId .. ': sending ' .. #ids .. ' series to ' .. FORECAST_MODALITY)
  -- Synchronous: the series are marked as routed only once the node has acknowledged every
  -- instance (it acknowledges only after the data is on its disk).
  local body = DumpJson({ Resources = ids, Synchronous = true, Permissive = false }, true)
  local ok, answer = pcall(RestApiPost, '/modalities/' .. FORECAST_MODALITY .. '/store', body)
  if not ok or answer == nil then
    log('study ' .. studyId .. ': C-STORE to ' .. FORECAST_MODALITY .. ' failed; resend it with '
        .. 'POST /modalities/' .. FORECAST_MODALITY .. '/store once the node is reachable')
    return
  end
  local result = ParseJson(answer)
  local failed = tonumber(result['FailedInstancesCount'] or 0) or 0
  if failed > 0 then
    log(string.format('study %s: %d instance(s) not accepted by the node', studyId, failed))
    return
  end
  for _, series in ipairs(selected) do
    markRouted(series)
  end
  log(string.format('study %s: %d instance(s) sent', studyId,
                    math.floor(tonumber(result['InstancesCount'] or 0) or 0)))
end
