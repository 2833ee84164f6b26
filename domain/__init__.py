"""imageledger.domain"""
